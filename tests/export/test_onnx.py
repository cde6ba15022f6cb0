import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import compactnn
from compactnn.core.qlayers import QuantConv2d, QuantLinear
from compactnn.errors import CompactnnError
from compactnn.export.onnx import export_onnx
from tests.deployment.conftest import make_net


@pytest.fixture(scope="module")
def qnet():
    torch.manual_seed(1)
    calib = torch.randn(32, 3, 16, 16)
    return compactnn.compress(make_net(), "w8a8", calib_data=calib, progress=False), calib


def test_round_trip_within_one_step(qnet, tmp_path):
    qmodel, calib = qnet
    path = tmp_path / "model.onnx"
    result = export_onnx(qmodel, path, example=calib[:8])
    assert result.max_diff_steps <= 1.0 and path.exists()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)  # another batch size: the batch axis is dynamic
    out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        ref = qmodel(x)
    step = (ref.max() - ref.min()).item() / 255
    assert (ref - out).abs().max().item() <= step


def test_weights_are_the_integer_codes_unchanged(qnet, tmp_path):
    qmodel, calib = qnet
    path = tmp_path / "model.onnx"
    export_onnx(qmodel, path, example=calib[:4])
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    int8_weights = [
        inits[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim > 1
    ]
    layers = [m for m in qmodel.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(int8_weights) == len(layers)
    assert all(w.dtype == np.int8 for w in int8_weights)
    expected = sorted(m.weight_codes.numpy().tobytes() for m in layers)
    assert sorted(w.tobytes() for w in int8_weights) == expected
    # every Conv/Gemm reads a Q -> DQ activation (the simulation's input quantizer)
    producer = {o: n for n in graph.node for o in n.output}
    compute = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(compute) == len(layers)
    for n in compute:
        dq = producer[n.input[0]]
        assert dq.op_type == "DequantizeLinear"
        assert producer[dq.input[0]].op_type == "QuantizeLinear"
    # and no float copy of a weight is left
    assert not any(v.dtype == np.float32 and v.ndim > 1 for v in inits.values())


def test_failed_check_leaves_no_file(qnet, tmp_path):
    qmodel, calib = qnet
    path = tmp_path / "model.onnx"
    with pytest.raises(CompactnnError, match="FAILED"):
        export_onnx(qmodel, path, example=calib[:4], tolerance=-1.0)
    assert not path.exists()
    with pytest.raises(CompactnnError, match="example="):
        export_onnx(qmodel, path, example=None)


def test_output_path_checked_before_the_export(qnet, tmp_path, monkeypatch):
    qmodel, calib = qnet
    import compactnn.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "to_onnx_bytes", lambda *a: pytest.fail("exported"))
    with pytest.raises(CompactnnError, match=r"is a folder.*model\.onnx"):
        export_onnx(qmodel, tmp_path, example=calib[:4])
    (tmp_path / "old.onnx").write_bytes(b"mine")
    with pytest.raises(CompactnnError, match="exists; pass force=True"):
        export_onnx(qmodel, tmp_path / "old.onnx", example=calib[:4])
    assert (tmp_path / "old.onnx").read_bytes() == b"mine"
    monkeypatch.undo()
    export_onnx(qmodel, tmp_path / "new" / "m.onnx", example=calib[:4])  # parent created
    export_onnx(qmodel, tmp_path / "old.onnx", example=calib[:4], force=True)
    assert onnx.load(str(tmp_path / "old.onnx")).graph.node
