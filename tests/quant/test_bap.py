"""Binary augmented pruning: support, frozen weight, gradients, artifact size, round trip."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

import compactnn
import compactnn.quant.bap as bap_module
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.recipe import Recipe, Step, resolve_recipe


@pytest.fixture
def bap():
    """The method module (registered at collection, as methods.py will)."""
    return bap_module


def test_support_is_the_hand_computed_top_k_of_the_residual(bap):
    w = torch.tensor([[0.9, -0.1, 0.5, -1.5], [0.2, 0.25, -0.2, 0.75]])
    # alpha_0 = [0.75, 0.35]; |w - alpha_0 sign w| = [[.15, .65, .25, .75], [.15, .10, .15, .40]]
    # top-3 over the layer: .75, .65, .40 -> (0, 3), (0, 1), (1, 3)
    mask = bap.residual_support(w, 3)
    expect = torch.tensor([[False, True, False, True], [False, False, False, True]])
    assert torch.equal(mask, expect)


def test_frozen_weight_is_alpha_b_plus_s_exactly(bap):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3)
    cfg = bap.BAPConfig(act=None, density=0.1)
    wq = bap.BAPWeight(layer.weight, cfg)
    w = layer.weight.detach()
    mask = wq.mask
    assert int(mask.sum()) == round(0.1 * w.numel())
    # independent: alpha = fp16(mean over off-support |w|) per filter, S = fp16(w - alpha B)
    off = ~mask
    alpha = torch.stack([w[o][off[o]].abs().mean() for o in range(4)]).half().float()
    b = torch.where(w >= 0, 1.0, -1.0)
    s = torch.where(mask, (w - alpha.view(-1, 1, 1, 1) * b).half().float(), 0.0)
    frozen = bap.BAPTrainLayer("c", layer, wq, None, compactnn_ctx()).freeze()
    assert torch.equal(frozen.binary.weight, alpha.view(-1, 1, 1, 1) * b)
    assert torch.equal(frozen.sparse_weight(), s)
    assert torch.equal(frozen.weight, alpha.view(-1, 1, 1, 1) * b + s)
    assert torch.equal(wq(layer.weight).detach(), frozen.weight)  # training = frozen
    x = torch.randn(2, 3, 5, 5)
    ref = nn.functional.conv2d(x, alpha.view(-1, 1, 1, 1) * b + s, layer.bias)
    assert torch.equal(frozen(x), ref)


def test_int8_frozen_weight_is_what_training_computed(bap):
    torch.manual_seed(1)
    layer = nn.Linear(16, 4)
    wq = bap.BAPWeight(layer.weight, bap.BAPConfig(act=None, density=0.1, value_bits=8))
    frozen = bap.BAPTrainLayer("l", layer, wq, None, compactnn_ctx()).freeze()
    assert frozen.sparse.weight_codes.dtype == torch.int8
    assert int((frozen.sparse.weight_codes != 0).sum()) == round(0.1 * 64)
    assert torch.equal(wq(layer.weight).detach(), frozen.weight)


def compactnn_ctx():
    from compactnn.core.context import CompressContext

    return CompressContext(batches=[], call_mode="auto", seed=0, progress=False)


def test_int8_values_round_on_a_per_filter_grid(bap):
    w = torch.tensor([[3.0, 0.1, 0.1, 0.1, -2.0, 0.1]])
    mask = bap.residual_support(w, 2)  # the 3.0 and the -2.0
    _, alpha, s = bap.bap_weight(w, mask, 8)
    assert float(alpha) == pytest.approx(0.1, rel=1e-3)
    a = alpha.item()
    step = torch.tensor((3.0 - a) / 127).half().float()
    codes = torch.round(torch.tensor([3.0 - a, -2.0 + a]) / step)
    assert torch.equal(s[0, [0, 4]], codes * step)
    assert torch.equal(s[0, [1, 2, 3, 5]], torch.zeros(4))


def test_gradient_is_identity_on_the_support_and_ste_off_it(bap):
    w = torch.tensor([[0.9, -0.1, 0.5, -1.5], [0.2, 0.25, -0.2, 0.75]], requires_grad=True)
    mask = bap.residual_support(w, 3)
    g = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    (bap.bap_weight(w, mask, 16)[0] * g).sum().backward()
    # written formula: on M: g; off M: alpha * g (|w| <= 1) + sign(w) * d alpha/dw * sum_off g b
    off = (~mask).float()
    b = torch.where(w >= 0, 1.0, -1.0).detach()
    n_off = off.sum(1, keepdim=True)
    alpha = ((w.detach().abs() * off).sum(1, keepdim=True) / n_off).half().float()
    ste = (w.detach().abs() <= 1).float()
    through_alpha = b * off / n_off * (g * b * off).sum(1, keepdim=True)
    expect = torch.where(mask, g, alpha * g * ste + through_alpha)
    torch.testing.assert_close(w.grad, expect, rtol=0, atol=1e-6)


def test_support_is_reselected_then_kept(bap):
    w = torch.tensor([[1.0, 0.1, 0.5, 0.4]])
    wq = bap.BAPWeight(w, bap.BAPConfig(density=0.25, reselect_fraction=0.5))
    assert torch.equal(wq.mask, torch.tensor([[True, False, False, False]]))
    moved = torch.tensor([[0.5, 0.1, 0.5, 3.0]])
    wq.start_epoch(moved, 1, 4)  # 1 < ceil(0.5 * 4): re-selected
    assert torch.equal(wq.mask, torch.tensor([[False, False, False, True]]))
    wq.start_epoch(w, 2, 4)  # kept from epoch 2 on
    assert torch.equal(wq.mask, torch.tensor([[False, False, False, True]]))


def _linear_model():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 4)
    with torch.no_grad():  # every 16th weight far from +-alpha: the support, evenly spaced
        lin.weight.copy_(torch.rand(4, 64, generator=g) * 0.2 + 0.9)
        lin.weight.view(-1)[::16] = 5.0
    return nn.Sequential(lin)


def _data_bytes(path) -> int:
    raw = (path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - n


@pytest.mark.parametrize("value_bits", [16, 8])
def test_artifact_bytes_are_the_hand_count_and_reload_is_exact(bap, tmp_path, value_bits):
    m = _linear_model()
    cfg = bap.BAPConfig(act=None, first_last_bits=None, density=1 / 16, value_bits=value_bits)
    q = compactnn.compress(m, Recipe("t", (Step("bap", cfg),)), progress=False)
    assert torch.equal(q[0].sparse_weight() != 0, torch.arange(256).view(4, 64) % 16 == 0)
    compactnn.save(q, tmp_path / "a")
    # codes 256 bits + levels 4x2 fp16 + bias 4 fp32 + 16 positions at 4-bit gaps (all 15)
    common = 32 + 16 + 16 + 8
    values = 16 * 2 if value_bits == 16 else 16 * 1 + 4 * 2  # fp16, or int8 + fp16 scales
    assert _data_bytes(tmp_path / "a") == common + values
    header = json.loads((tmp_path / "a" / "compactnn.json").read_text())
    values_kind = "float16" if value_bits == 16 else "int8"
    assert header["extra"]["bap_layers"] == {"0": {"values": values_kind}}
    back = compactnn.load(tmp_path / "a", model=_linear_model())
    x = torch.randn(8, 64)
    assert torch.equal(q(x), back(x))
    assert torch.equal(back[0].weight, q[0].weight)


def test_cnn_with_8_bit_activations_round_trips(bap, tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 16, 5),
    ).eval()  # fmt: skip
    x = torch.randn(16, 3, 6, 6)
    for recipe in ("w1a8-bap", "w1a8-bap-sp95-int8"):
        q = compactnn.compress(m, recipe, calib_data=x, progress=False)
        assert isinstance(q[3], bap.BAPLayer) and isinstance(q[5], bap.BAPLayer)
        compactnn.save(q, tmp_path / recipe)
        back = compactnn.load(tmp_path / recipe, model=m)
        assert torch.equal(q(x), back(x))


def test_short_names_and_config_errors(bap):
    cfg = resolve_recipe("w1a8-bap-sp99").steps[0].config
    assert (cfg.density, cfg.value_bits, cfg.act.bits) == (0.01, 16, 8)
    cfg = resolve_recipe("w1-bap-sp98.5-int8").steps[0].config
    assert (cfg.density, cfg.value_bits, cfg.act) == (0.015, 8, None)
    assert resolve_recipe("w1a8-bap").steps[0].config.density == 0.02
    with pytest.raises(CompactnnError, match="sparsity"):
        resolve_recipe("w1a8-bap-sp100")
    with pytest.raises(CompactnnError, match="density"):
        bap.BAPConfig(density=0.0)
    with pytest.raises(CompactnnError, match="value_bits"):
        bap.BAPConfig(value_bits=4)
    with pytest.raises(CompactnnError, match="1-bit weights"):
        resolve_recipe("w2a8-bap")
    with pytest.raises(CompactnnError, match="1-bit activations"):
        resolve_recipe("w1a1-bap")


def test_damaged_header_entry_is_refused(bap):
    m = _linear_model()
    with pytest.raises(ArtifactError, match="bap_layers"):
        bap.restore_bap(m, {"bap_layers": {"0": {"values": "float32"}}})
    with pytest.raises(ArtifactError, match="bap_layers"):
        bap.restore_bap(m, {"bap_layers": {"nope": {"values": "int8"}}})
