import itertools
import json
import math
import struct

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.packing import packed_nbytes
from compactnn.core.spec import QuantSpec
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export.artifact import pack_model
from compactnn.quant.ffn import EXTRA_KEY, FFNConfig, restore_factorized
from compactnn.quant.ffn_factor import (
    best_ternary,
    joint_scales,
    rank_for_budget,
    stored_bytes,
    ternary_factorize,
)
from tests.quant._ptq_models import images, tiny_resnet


def test_best_ternary_against_brute_force():
    z = torch.tensor([0.9, -0.2, 0.5, -1.3, 0.05])
    best = max(
        (torch.tensor(t, dtype=torch.float32) for t in itertools.product((-1, 0, 1), repeat=5)),
        key=lambda t: float((t @ z) / max(int((t != 0).sum()), 1) ** 0.5),  # (t.z)^2/|t|, t.z > 0
    )
    assert torch.equal(best_ternary(z), best)


def test_factorization_error_never_increases():
    w = torch.randn(12, 27, generator=torch.Generator().manual_seed(0))
    u, v, d, history = ternary_factorize(w, 8, iters=10)
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(history))
    assert history[-1] < 0.95 * history[0]
    assert set(u.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert set(v.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert math.isclose(float((w - (u * d) @ v.T).pow(2).sum()), history[-1], rel_tol=1e-5)


def test_joint_scales_against_lstsq_of_the_layer_outputs():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(6, 10, generator=g), torch.randn(50, 10, generator=g)
    u, v, _, _ = ternary_factorize(w, 4, iters=3)
    # columns vec(X v_k u_k^T): the outputs each rank-one term contributes
    design = torch.stack([(x @ v[:, k : k + 1] @ u[:, k : k + 1].T).reshape(-1) for k in range(4)])
    ref = torch.linalg.lstsq(design.T.double(), (x @ w.T).reshape(-1, 1).double()).solution
    assert torch.allclose(joint_scales(w, u, v, x.T @ x).double(), ref.squeeze(1), atol=1e-4)


def test_rank_from_the_budget_by_hand():
    # 16 x 144 conv at 2 bits: w2 stores 576 code bytes + 3 per channel = 624;
    # rank r stores 36r + 4r (codes) + 2r (d) + 32 (unit scales) = 42r + 32 -> r = 14
    assert stored_bytes(16, 144, 14) == 620 and stored_bytes(16, 144, 15) == 662
    assert rank_for_budget(16, 144, 2.0) == 14


def test_config_and_short_name_errors():
    with pytest.raises(CompactnnError, match="per layer"):
        FFNConfig.from_short(2, 8, 32)
    with pytest.raises(CompactnnError, match="ternary"):
        FFNConfig(weight=QuantSpec(bits=3))
    assert FFNConfig.from_short(3, None, None).budget == 3.0
    assert FFNConfig.from_short(2, 8, None).act.bits == 8


def test_bad_header_ranks_are_refused():
    with pytest.raises(ArtifactError, match="factorizable"):
        restore_factorized(tiny_resnet(), {EXTRA_KEY: {"nope": 3}})
    with pytest.raises(ArtifactError, match="factorizable"):
        restore_factorized(tiny_resnet(), {EXTRA_KEY: {"block.conv1": -1}})


def test_two_layers_compute_the_factorization_and_load_bit_exactly(tmp_path):
    torch.set_num_threads(1)
    model, x = tiny_resnet(), images(16)
    q = compactnn.compress(model, "w2-ffn", calib_data=[x], progress=False)
    ranks = q._compactnn["extra"][EXTRA_KEY]
    assert set(ranks) == {"block.conv1", "block.conv2"}  # stem and fc: 8-bit convention
    seq = q.block.conv1
    assert isinstance(seq, nn.Sequential) and seq[0].out_channels == ranks["block.conv1"]
    v = seq[0].weight_codes.float().reshape(seq[0].out_channels, -1)  # (r, K)
    d = seq[0].weight_scale.reshape(-1)
    u = seq[1].weight_codes.float().reshape(seq[1].out_channels, -1)  # (out, r)
    w = ((u * d) @ v).reshape(q.block.conv1[1].out_channels, 8, 3, 3)
    h = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = nn.functional.conv2d(h, w, seq[1].bias, padding=1)
    assert torch.allclose(seq(h), ref, atol=1e-5)
    tensors, *_ = pack_model(q)
    for name, r in ranks.items():
        assert tensors[f"{name}.0.weight.packed"].numel() == packed_nbytes(r * 72, 2)
        assert tensors[f"{name}.1.weight.packed"].numel() == packed_nbytes(8 * r, 2)
    path = tmp_path / "a"
    compactnn.save(q, path)
    loaded = compactnn.load(path, model=tiny_resnet())
    assert torch.equal(q(x), loaded(x))
    raw = (path / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert set(json.loads(raw[8 : 8 + header_len])) - {"__metadata__"} == set(tensors)
    assert len(raw) == 8 + header_len + sum(t.nbytes for t in tensors.values())


def test_quantized_activations_on_both_factors_load_bit_exactly(tmp_path):
    torch.set_num_threads(1)
    x = images(16)
    q = compactnn.compress(tiny_resnet(), "w2a8-ffn", calib_data=[x], progress=False)
    seq = q.block.conv2
    assert seq[0].input_quantizer.calibrated and seq[1].input_quantizer.calibrated
    compactnn.save(q, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a", model=tiny_resnet())
    assert torch.equal(q(x), loaded(x))
