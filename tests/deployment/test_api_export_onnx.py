"""``DeployedModel.export_onnx`` (onnxruntime backend): the file holds the int8 QDQ form
(the integer weight codes, not the float32 weights the session folds for speed), computes
what the deployed model computes, and ``force=True`` replaces only an earlier ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.errors import CompactnnError
from tests.export._conv_net import conv_net

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from compactnn.export.ort import ort_callable  # noqa: E402


@pytest.fixture(scope="module")
def fast():
    torch.manual_seed(0)
    calib = torch.randn(32, 3, 6, 6)
    qmodel = compactnn.compress(conv_net(), "w8a8", calib_data=calib, progress=False)
    return compactnn.deploy(qmodel, "onnxruntime", example=calib[:8]), qmodel


def _layer_weights(graph) -> list[np.ndarray]:
    """The stored tensor behind each Conv / Gemm weight input (through its DequantizeLinear)."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    found = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            name = node.input[1]
            if name in producer and producer[name].op_type == "DequantizeLinear":
                name = producer[name].input[0]
            found.append(inits[name])
    return found


def test_written_file_holds_the_int8_codes_and_runs_as_deployed(fast, tmp_path):
    deployed, qmodel = fast
    path = tmp_path / "m.onnx"
    deployed.export_onnx(path)
    weights = _layer_weights(onnx.load(str(path)).graph)
    assert len(weights) == 4 and all(w.dtype == np.int8 for w in weights)
    codes = sorted(m.weight_codes.numpy().tobytes() for m in qmodel.modules()
                   if hasattr(m, "weight_codes"))  # fmt: skip
    assert sorted(w.tobytes() for w in weights) == codes
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ort_callable(path.read_bytes())(x), deployed(x))
    # the session runs the float-output head on its folded float32 weight (same numbers)
    folded = _layer_weights(onnx.load_from_string(deployed.onnx_bytes).graph)
    assert sorted(w.dtype.name for w in folded) == ["float32", "int8", "int8", "int8"]


def test_force_replaces_only_an_earlier_onnx_export(fast, tmp_path):
    deployed, _ = fast
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({"w": torch.ones(4)}, str(ckpt))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for path in (ckpt, notes):
        before = path.read_bytes()
        with pytest.raises(CompactnnError) as info:
            deployed.export_onnx(path, force=True)
        message = str(info.value)
        assert "\n" not in message and repr(str(path)) in message
        assert "replaces only an earlier ONNX export" in message
        assert path.read_bytes() == before
    old = tmp_path / "old.onnx"
    deployed.export_onnx(old)
    deployed.export_onnx(old, force=True)  # an earlier export: replaced
    assert onnx.load(str(old)).graph.node
