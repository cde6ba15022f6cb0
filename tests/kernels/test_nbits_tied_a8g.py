"""An a8g LM head tied to its token table (``w4a8g-g32``: the head kept at 8 bits per channel,
its input on per-group dynamic int8) is a pinned MatMulNBits on the input's blocks, and the
table gathers from its codes: no float copy of the head, the simulated head's numbers."""

from __future__ import annotations

import warnings

import pytest

import compactnn
from compactnn.kernels import ort_nbits
from compactnn.kernels.nbits_check import PINNED
from tests.kernels.test_nbits_tied import _tied_llama

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", message=".*calibration samples")


def _export(q, batch, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = compactnn.to_ort_nbits(q, batch, threads=1, path=path)
    said = [str(w.message) for w in caught if "to_ort_nbits" in str(w.message)]
    return fast, onnx.load(str(path)), said


def test_a_tied_a8g_head_is_matmulnbits_on_the_tables_codes(tmp_path, monkeypatch):
    model, calib = _tied_llama()
    q = compactnn.compress(model, "w4a8g-g32", calib_data=calib, progress=False)
    head, table = q.lm_head, q.get_input_embeddings()
    assert head.weight_spec.granularity == "channel" and head.input_quantizer.is_group
    assert head.weight_codes.data_ptr() == table.weight_codes.data_ptr()  # tied
    batch = calib[0]
    fast, proto, said = _export(q, batch, tmp_path / "m.onnx")
    assert said == [] and fast.accuracy_level == 4
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    shape = set(head.weight.shape)
    assert not [n for n, a in arrays.items() if a.dtype.kind == "f" and set(a.shape) == shape]
    (node,) = [n for n in proto.graph.node if "lm_head" in n.name and n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in node.attribute}
    assert PINNED in node.name and attrs["accuracy_level"] == 4
    assert (attrs["bits"], attrs["block_size"]) == (8, 32)  # the input's groups
    (gbq,) = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert gbq.input[0] == node.input[1]  # the table reads the head's codes: stored once
    got = fast(**batch)[0]
    # the same numbers as the head simulated in the graph (its float weight and fake-quant),
    # as it was when a per-channel grid under an input grid had no format
    real = ort_nbits._nbits_format

    def before(m):
        old_rule = m.input_quantizer is not None and m.weight_spec.granularity == "channel"
        return None if old_rule else real(m)

    monkeypatch.setattr(ort_nbits, "_nbits_format", before)
    old, _, old_said = _export(q, batch, tmp_path / "old.onnx")
    ref = old(**batch)[0]
    assert (got - ref).abs().max() <= 1e-6 * ref.abs().max()  # summation order: 2.7e-7
    # the float fallback is named in the warning now, and is much larger
    assert len(old_said) == 1 and "1 quantized layer left as float MatMul" in old_said[0]
    assert "lm_head" in old_said[0]
    assert old.nbytes - fast.nbytes > head.weight.numel() * 3  # float32 against 8-bit codes
