"""The keyword inputs of a model on ONNX Runtime: checked against the graph's own inputs."""

from __future__ import annotations

import warnings

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.kernels.ort_nbits import to_ort_nbits
from tests.kernels._keywords import Keywords

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", message=".*calibration samples")
pytestmark = [
    pytest.mark.filterwarnings("ignore:RTNConfig. the first/last-layer rule"),
    pytest.mark.filterwarnings("ignore:to_ort_nbits. accuracy_level=4"),
]


class _Typed(Keywords):
    """BERT's inputs: ``token_type_ids`` optional (zeros when left out), ``labels`` unused by
    the first output."""

    def __init__(self) -> None:
        super().__init__()
        self.types = torch.nn.Embedding(2, 64)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = (self.emb(input_ids) + self.types(token_type_ids)) * attention_mask.unsqueeze(-1)
        return (self.fc2(torch.nn.functional.gelu(self.fc1(h))),)


def _model():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(_Typed().eval(), "w4-g32", calib_data=[batch], progress=False)
    return q, batch


def test_a_key_the_graph_does_not_take_is_refused_not_dropped():
    q, batch = _model()
    fast = to_ort_nbits(q, batch, accuracy_level=0, threads=1)
    ones = dict(batch, token_type_ids=torch.ones_like(batch["input_ids"]))
    with torch.no_grad():
        assert not torch.equal(q(**ones)[0], q(**batch)[0])  # the key matters
    with pytest.raises(
        CompactnnError,
        match=r"^OrtNBitsModel: input 'token_type_ids' is not an input of this ONNX model "
        r"\(it takes input_ids, attention_mask;",
    ):
        fast(**ones)
    # traced with it, the model takes it and follows it
    typed = to_ort_nbits(q, ones, accuracy_level=0, threads=1)
    with torch.no_grad():
        torch.testing.assert_close(typed(**ones)[0], q(**ones)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(CompactnnError, match=r"missing input 'token_type_ids' \(the model takes"):
        typed(**batch)


def test_missing_inputs_and_dtypes():
    q, batch = _model()
    fast = to_ort_nbits(q, batch, accuracy_level=0, threads=1)
    ref = fast(**batch)[0]
    with pytest.raises(CompactnnError, match=r"^OrtNBitsModel: missing input 'attention_mask'"):
        fast(input_ids=batch["input_ids"])
    narrow = {
        "input_ids": batch["input_ids"].int(),
        "attention_mask": batch["attention_mask"].bool(),
    }
    assert torch.equal(fast(**narrow)[0], ref)  # cast to int64: exact
    with pytest.raises(
        CompactnnError,
        match=r"input 'input_ids' is torch.float32, the model takes int64: pass integer",
    ):
        fast(**dict(batch, input_ids=batch["input_ids"].float()))
    assert torch.equal(fast(**dict(batch, token_type_ids=None))[0], ref)  # None: not given


def test_example_keys_the_export_cannot_use_are_refused_before_running():
    q, batch = _model()
    with pytest.raises(
        CompactnnError,
        match=r"^to_ort_nbits: example key 'labels' is not used by the traced output "
        r"\(the exported model takes input_ids, attention_mask\): leave it out",
    ):
        to_ort_nbits(q, dict(batch, labels=batch["input_ids"]), threads=1)
    with pytest.raises(
        CompactnnError,
        match=r"^to_ort_nbits: example key 'pixels' is not an argument of _Typed.forward",
    ):
        to_ort_nbits(q, dict(batch, pixels=batch["input_ids"]), threads=1)


def test_an_existing_file_is_replaced_only_with_force(tmp_path):
    q, batch = _model()
    path = tmp_path / "m.onnx"
    path.write_bytes(b"mine")
    with pytest.raises(
        CompactnnError, match=rf"^to_ort_nbits: {path} already exists; pass force=True"
    ):
        to_ort_nbits(q, batch, threads=1, path=path)
    assert path.read_bytes() == b"mine"
    path.unlink()
    data = tmp_path / "m.onnx.data"
    data.write_bytes(b"mine too")
    with pytest.raises(CompactnnError, match=r"m\.onnx\.data already exists; pass force=True"):
        to_ort_nbits(q, batch, threads=1, path=path)
    assert data.read_bytes() == b"mine too" and not path.exists()
    fast = to_ort_nbits(q, batch, accuracy_level=0, threads=1, path=path, force=True)
    assert fast.path == path and data.stat().st_size > 1000
    del fast
    with pytest.raises(CompactnnError, match=r"already exists"):
        to_ort_nbits(q, batch, threads=1, path=path)  # its own earlier output too
    with pytest.raises(CompactnnError, match=r"is a folder; give the model file's name"):
        to_ort_nbits(q, batch, threads=1, path=tmp_path)
    deep = tmp_path / "new" / "sub" / "m.onnx"
    assert to_ort_nbits(q, batch, threads=1, path=deep).path == deep  # parents created
