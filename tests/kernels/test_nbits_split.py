"""8-bit MatMulNBits layers below accuracy_level=4 run as two 4-bit halves (nbits_split):
exact against the simulated model, the 8-bit node kept at level 4."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import compactnn
from compactnn.core.qlayers import quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.kernels.nbits_split import halves
from compactnn.kernels.ort_nbits import OrtNBitsModel, nbits_onnx
from tests.kernels._keywords import Keywords

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:-1], -1)


def test_halves_rebuild_every_code():
    codes = np.random.default_rng(0).integers(0, 256, (3, 5, 32), dtype=np.uint8)
    hi, lo = halves(codes)
    assert hi.shape == lo.shape == (3, 5, 16)
    assert np.array_equal(16 * _nibbles(hi).astype(int) + _nibbles(lo), codes)


class _Head(torch.nn.Module):
    """An embedding and one quantized linear layer, called with keyword tensors."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(40, 128)
        self.fc = quantize_layer_rtn(torch.nn.Linear(128, 72), spec, None)

    def forward(self, input_ids, attention_mask):
        return (self.fc(self.emb(input_ids) * attention_mask.unsqueeze(-1)),)


def _ops(data: bytes) -> list[tuple[str, int, int]]:
    nodes = [n for n in onnx.load_from_string(data).graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes]
    return sorted(("MatMulNBits", a["bits"], a.get("accuracy_level", 0)) for a in attrs)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [16, None])
def test_an_8bit_layer_at_level_0_is_two_exact_4bit_halves(symmetric, group):
    torch.manual_seed(0)
    granularity = "group" if group else "channel"
    spec = QuantSpec(bits=8, symmetric=symmetric, granularity=granularity, group_size=group)
    model = _Head(spec).eval()
    ids = torch.randint(0, 40, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = model(**batch)[0].double()
        exact, _ = nbits_onnx(model, batch, accuracy_level=0, bf16_tables=False)
        fast, _ = nbits_onnx(model, batch, accuracy_level=4, bf16_tables=False)
        got = OrtNBitsModel(exact, list(batch), threads=1)(**batch)[0].double()
    # the halves merged into one 4-bit node (nbits_merge), no 8-bit node left at level 0
    assert _ops(exact) == [("MatMulNBits", 4, 0)]
    assert _ops(fast) == [("MatMulNBits", 8, 4)]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_the_level_0_fallback_splits_the_8bit_layers(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(Keywords().eval(), "w8-g32", calib_data=[batch], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compactnn.to_ort_nbits(q, batch, threads=1, path=tmp_path / "m.onnx")
    assert out.accuracy_level == 0, "level 4 (int8 activations) should drift on this model"
    assert any("running accuracy_level=0" in str(w.message) for w in caught)
    assert {bits for _, bits, _ in _ops((tmp_path / "m.onnx").read_bytes())} == {4}
    with torch.no_grad():
        ref = q(**batch)[0].double()
    got = out(**batch)[0].double()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert out.accuracy_check["level_0"]["relative_max_diff"] < 1e-5
