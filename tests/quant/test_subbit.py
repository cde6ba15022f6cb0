import itertools
import json
import struct

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import freeze_layer
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export.artifact import pack_model
from compactnn.quant.subbit import (
    EXTRA_KEY,
    SubbitConfig,
    SubbitConv2d,
    SubbitWeight,
    frequent_patterns,
    restore_subbit,
    subbit_layer,
    to_subbit,
)
from compactnn.recipe import Recipe, Step
from tests.quant._ptq_models import images, tiny_resnet


def _pattern(bits: str) -> list[float]:
    return [1.0 if b == "1" else -1.0 for b in bits]


def test_most_frequent_patterns_by_hand():
    a, b, c = _pattern("111111111"), _pattern("000000001"), _pattern("101010101")
    rows = torch.tensor([a, b, b, c, c, c])
    assert frequent_patterns(rows, 2).tolist() == [c, b]
    # fewer distinct rows than asked: the rest are padding, the used ones come first
    assert frequent_patterns(rows, 4)[:3].tolist() == [c, b, a]


def _frozen(tau: int, seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    wq = SubbitWeight(conv.weight, tau)
    return conv, wq, freeze_layer(conv, wq, None)


def test_training_forward_uses_only_codebook_patterns():
    conv, wq, _ = _frozen(4)
    w_hat = wq(conv.weight)
    signs = torch.sign(w_hat.detach()).reshape(-1, 9)
    codebook = {tuple(p) for p in wq.patterns.tolist()}
    assert len(codebook) == 16 and all(tuple(s) in codebook for s in signs.tolist())
    w_hat.sum().backward()  # straight through: every latent weight |w| < 1 gets a gradient
    assert (conv.weight.grad != 0).all()


def test_stored_codebook_reproduces_the_frozen_kernels_exactly():
    _, _, frozen = _frozen(4)
    sub = subbit_layer(frozen, 4)
    assert sub.patterns.numel() == 18 and sub.indices.numel() == 32  # 16*9 bits, 64*4 bits
    assert torch.equal(sub.decoded_weight(), frozen.weight)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(sub(x), frozen(x))


def test_post_hoc_mapping_takes_the_nearest_pattern_in_hamming_distance():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    bw = SubbitWeight(conv.weight, 8)  # 256 patterns >= 64 kernels: plain binary kernels
    frozen = freeze_layer(conv, bw, None)
    sub = subbit_layer(frozen, 4)
    kernels = (frozen.weight_codes.float() * 2 - 1).reshape(-1, 9)
    book = sub.codebook()
    got = torch.sign(sub.decoded_weight()).reshape(-1, 9)
    for k, g in itertools.islice(zip(kernels, got, strict=True), 64):
        best = min(int((k != p).sum()) for p in book)
        assert int((k != g).sum()) == best


def test_config_errors_and_bad_header():
    with pytest.raises(CompactnnError, match="tau"):
        SubbitConfig(tau=3)
    with pytest.raises(CompactnnError, match="1-bit activations"):
        SubbitConfig(act=QuantSpec(bits=1, symmetric=False, granularity="tensor"))
    with pytest.raises(ArtifactError, match="3x3"):
        restore_subbit(tiny_resnet(), {EXTRA_KEY: {"fc": {"tau": 6, "act_spec": None}}})


def test_artifact_is_bit_exact_and_of_its_packed_size(tmp_path):
    torch.set_num_threads(1)
    x = images(16)
    recipe = Recipe("w1a8-subbit-tau4", (Step("subbit", SubbitConfig(tau=4)),))
    q = compactnn.compress(tiny_resnet(), recipe, calib_data=[x], progress=False)
    to_subbit(q)  # the tau it was built with: 4
    subs = {n: m for n, m in q.named_modules() if isinstance(m, SubbitConv2d)}
    assert set(subs) == {"block.conv1", "block.conv2"}
    tensors, *_ = pack_model(q)
    for name in subs:  # 16 patterns x 9 bits, 64 kernels x 4 bits, 8 float16 scales
        assert tensors[f"{name}.patterns"].nbytes == 18
        assert tensors[f"{name}.indices"].nbytes == 32
        assert tensors[f"{name}.alpha"].nbytes == 16
    path = tmp_path / "a"
    compactnn.save(q, path)
    loaded = compactnn.load(path, model=tiny_resnet())
    assert torch.equal(q(x), loaded(x))
    raw = (path / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert set(json.loads(raw[8 : 8 + header_len])) - {"__metadata__"} == set(tensors)
    assert len(raw) == 8 + header_len + sum(t.nbytes for t in tensors.values())
