"""Per-group dynamic activations (``w4a8g-g32``): the simulation is MatMulNBits' level 4."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.kernels import nbits_check
from compactnn.kernels.nbits_check import PINNED
from compactnn.recipe import resolve_recipe
from tests.kernels._keywords import Keywords, compressed, grouped_recipe

pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", message=".*calibration samples")


def _quantized():
    """Keywords' two linears at w4a8g-g32 (the first/last-layer rule off: both are 4-bit)."""
    q, batch = compressed(grouped_recipe())
    assert q.fc1.weight_spec.bits == 4
    return q, batch


def _nodes(path) -> dict[str, int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        n.name: a.i
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }


def test_short_name_groups_activations_like_the_weights():
    act = resolve_recipe("w4a8g-g32-gptq").steps[0].config.act
    assert (act.bits, act.symmetric, act.granularity, act.group_size) == (8, True, "group", 32)
    assert resolve_recipe("w4a8-g32").steps[0].config.act.granularity == "tensor"  # unchanged
    with pytest.raises(CompactnnError, match=r"add one, e.g. w4a8g-g32-gptq"):
        resolve_recipe("w4a8g-gptq")
    with pytest.raises(CompactnnError, match=r"LSQConfig: .*for the methods rtn and gptq"):
        resolve_recipe("w4a8g-g32-lsq")


def test_convolutions_are_refused_by_name():
    model = nn.Sequential(nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32 * 4, 32))
    x = torch.randn(2, 32, 2, 2)
    with pytest.raises(
        CompactnnError, match=r"convolution layers cannot take them: 0\. Use per-tensor"
    ):
        compactnn.compress(model, "w4a8g-g32", calib_data=x, progress=False)


def test_level_4_is_the_simulation_and_the_default_keeps_it(tmp_path):
    q, batch = _quantized()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        fast = compactnn.to_ort_nbits(q, batch, threads=1, path=tmp_path / "m.onnx")
    assert fast.accuracy_level == 4 and fast.accuracy_check["drifted"] is None
    levels = _nodes(tmp_path / "m.onnx")
    assert len(levels) == 2 and set(levels.values()) == {4}
    assert all(PINNED in name for name in levels)
    with torch.no_grad():
        ref = q(**batch)[0]
    got = fast(**batch)[0]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the same weights without the activation grid: level 4 is 1e-2 away from them
    plain = Keywords().eval()
    plain.load_state_dict({k: v for k, v in q.state_dict().items() if k in plain.state_dict()})
    with torch.no_grad():
        gap = (plain(**batch)[0] - ref).abs().max() / ref.abs().max()
    assert gap > 1e-3


def test_level_0_keeps_pinned_nodes_at_4(tmp_path):
    # level 0 (forced, or the fallback, which builds the model again at level 0)
    q, batch = _quantized()
    compactnn.to_ort_nbits(q, batch, accuracy_level=0, threads=1, path=tmp_path / "m.onnx")
    assert set(_nodes(tmp_path / "m.onnx").values()) == {4}


def test_artifact_round_trip_and_other_runtimes(tmp_path):
    q, batch = _quantized()
    compactnn.save(q, tmp_path / "a.cnn")
    back = compactnn.load(tmp_path / "a.cnn", model=Keywords())
    assert back.fc1.input_quantizer.is_group and back.fc1.input_quantizer.spec.group_size == 32
    with torch.no_grad():
        assert torch.equal(back(**batch)[0], q(**batch)[0])
    with pytest.warns(UserWarning, match=r"\(a8g\) or per-tensor \(a8d\) dynamic activations run"):
        kernels = compactnn.to_kernels(q)
    info = kernels._compactnn_kernels
    assert info["simulated"] == ["fc1", "fc2"]
    assert "per-group dynamic activations" in str(info["simulated_why"])


def test_drift_within_the_simulations_own_rounding_variation_keeps_level_4(monkeypatch):
    q, batch = _quantized()
    monkeypatch.setattr(nbits_check, "drifted", lambda measured: "forced")
    monkeypatch.setattr(nbits_check, "explained", lambda measured, probe: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = compactnn.to_ort_nbits(q, batch, threads=1)
    assert fast.accuracy_level == 4 and fast.accuracy_check["explained"] is True
    assert set(fast.accuracy_check["probe"]) == {
        "relative_max_diff",
        "min_cosine",
        "argmax_agreement",
    }


def test_unexplained_drift_of_an_all_pinned_model_warns_and_keeps_level_4(monkeypatch, tmp_path):
    q, batch = _quantized()
    monkeypatch.setattr(nbits_check, "drifted", lambda measured: "forced")
    monkeypatch.setattr(nbits_check, "explained", lambda measured, probe: False)
    with pytest.warns(UserWarning, match=r"every layer runs at accuracy_level=4"):
        fast = compactnn.to_ort_nbits(q, batch, threads=1, path=tmp_path / "m.onnx")
    assert fast.accuracy_level == 4 and set(_nodes(tmp_path / "m.onnx").values()) == {4}


def test_rounding_probe_moves_a_quantized_activation_simulation_more_than_a_weight_only_one():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(128, 128), nn.GELU())]).eval()
    x = torch.randn(512, 128)  # enough values that some sit on a rounding boundary

    class Kw(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inputs):
            return (self.net(inputs),)

    moved = {}
    for recipe in ("w4-g32", "w4a8g-g32"):
        q = compactnn.compress(Kw(model), recipe, calib_data=[{"inputs": x}], progress=False)
        with torch.no_grad():
            ref = q(inputs=x)[0]
        moved[recipe] = nbits_check.rounding_probe(q, {"inputs": x}, ref)["relative_max_diff"]
    assert moved["w4-g32"] < 1e-5 and moved["w4a8g-g32"] > 1e-3  # 0.0 and 2.4e-3 measured
