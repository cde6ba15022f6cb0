"""Per-channel weights whose K is not a power of two (MiniLM: 384, 1536) run on MatMulNBits as
blocks of 128 with the row's scale repeated: the same numbers as the simulation."""

from __future__ import annotations

import pytest
import torch

from compactnn.core.qlayers import quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.kernels.ort_nbits import OrtNBitsModel, nbits_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class _Layer(torch.nn.Module):
    def __init__(self, spec: QuantSpec, k: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(30, k)
        self.fc = quantize_layer_rtn(torch.nn.Linear(k, 40), spec, None)

    def forward(self, input_ids, attention_mask):
        return (self.fc(self.emb(input_ids) * attention_mask.unsqueeze(-1)),)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("k", "block"), [(384, 128), (96, 32), (1536, 128)])
def test_a_per_channel_layer_runs_in_blocks_with_its_row_scale(bits, k, block):
    torch.manual_seed(0)
    spec = QuantSpec(bits=bits, symmetric=False, granularity="channel")
    model = _Layer(spec, k).eval()
    ids = torch.randint(0, 30, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = model(**batch)[0].double()
        data, left = nbits_onnx(model, batch, accuracy_level=0, bf16_tables=False)
        got = OrtNBitsModel(data, list(batch), threads=1)(**batch)[0].double()
    assert left == []
    nodes = [n for n in onnx.load_from_string(data).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all(
        next(a.i for a in n.attribute if a.name == "block_size") == block for n in nodes
    )
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
