"""Weight-only models on ONNX Runtime MatMulNBits against the simulated model."""

from __future__ import annotations

import warnings

import pytest
import torch

import compactnn
from compactnn.core.qlayers import quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.kernels.ort_nbits import OrtNBitsModel, nbits_onnx, nbits_tensors

pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", message=".*calibration samples")


def test_nbits_tensors_pack_our_codes_low_nibble_first():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    q = quantize_layer_rtn(torch.nn.Linear(32, 3), spec, None)
    t = nbits_tensors(q, 4, 16)
    assert t["B"].shape == (3, 2, 8) and t["scales"].shape == (6,)
    codes = q.weight_codes.to(torch.int32)  # (3, 32), 0..15
    lo, hi = (t["B"] & 15).int(), (t["B"] >> 4).int()  # (3, 2, 8)
    assert torch.equal(torch.stack([lo, hi], -1).reshape(3, 32), codes)
    zero = q.weight_zero.to(torch.int32).reshape(-1)  # (6,) -> 3 bytes
    assert torch.equal((t["zero_points"] & 15).int(), zero[0::2])
    assert torch.equal((t["zero_points"] >> 4).int(), zero[1::2])


class _Keywords(torch.nn.Module):
    """A small keyword-input 'encoder': embedding, two linears, a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 64)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return (self.fc2(torch.nn.functional.gelu(self.fc1(h))),)


@pytest.mark.parametrize("recipe", ["w4-g32", "w3-g32"])
def test_exported_model_runs_our_codes(recipe):
    torch.manual_seed(0)
    model = _Keywords().eval()
    ids = torch.randint(0, 50, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(model, recipe, calib_data=[batch], progress=False)
    with torch.no_grad():
        ref = q(**batch)[0]
        # float32 compute, float32 tables: the simulation up to summation order
        data, left = nbits_onnx(q, batch, accuracy_level=0, bf16_tables=False)
        exact = OrtNBitsModel(data, list(batch), threads=1)(**batch)[0]
        # first/last layers keep 8-bit groups: MatMulNBits bits=8 takes them too
        assert left == []
        torch.testing.assert_close(exact, ref, rtol=1e-4, atol=1e-4)
        # int8 activations per block (VNNI): a relative error of a few tenths of a percent
        data4, _ = nbits_onnx(q, batch, accuracy_level=4, bf16_tables=False)
        fast = OrtNBitsModel(data4, list(batch), threads=1)(**batch)[0]
    assert float((fast - ref).norm() / ref.norm()) < 0.03
    assert b"MatMulNBits" in data
    other = model.fc1.weight.detach().T.contiguous().numpy().tobytes()
    assert other[:256] not in data  # the float weights are gone, only our codes remain
