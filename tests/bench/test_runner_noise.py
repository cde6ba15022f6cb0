"""Log noise the bench (and every kernel user) printed: torch's "No CUDA runtime is found" on a
CPU machine, ONNX Runtime's quantizer advice, and the kernel build's time estimate."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from compactnn.errors import CompactnnError
from compactnn.kernels import bitconv

CUDA_NOTICE = "No CUDA runtime is found"


def test_the_cuda_notice_is_dropped_once_the_kernels_load(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no build there to import
    log = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(log, "filters", [])  # as in a fresh process
    with caplog.at_level(logging.WARNING):
        log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
    assert caplog.records  # seen without the filter
    caplog.clear()
    monkeypatch.setattr(bitconv, "_EXT", None)
    monkeypatch.setattr(bitconv, "_ERROR", None)
    monkeypatch.setattr(bitconv.shutil, "which", lambda name: None)  # fails fast: no compiler
    with pytest.raises(CompactnnError, match="needs a C\\+\\+ compiler"):
        bitconv.load_extension()  # installs the filter first, whatever happens next
    with caplog.at_level(logging.WARNING):
        log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        log.warning("Error checking compiler version for %s", "c++")  # others still pass
    assert [r.getMessage() for r in caplog.records] == ["Error checking compiler version for c++"]
    bitconv.quiet_cuda_notice()  # idempotent
    assert sum(isinstance(f, bitconv._NoCudaNotice) for f in log.filters) == 1


def test_importing_torchs_build_tools_after_the_filter_is_quiet():
    """The real record, in a fresh process; where this machine would not log it (no CUDA
    toolkit found, or a GPU) there is nothing to hide."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    bare = "import torch.utils.cpp_extension"
    ours = "from compactnn.kernels import bitconv\nbitconv.quiet_cuda_notice()\n" + bare
    run = [sys.executable, "-c"]
    plain = subprocess.run([*run, bare], env=env, capture_output=True, text=True, timeout=300)
    if CUDA_NOTICE not in plain.stderr:
        pytest.skip("torch logs no CUDA notice on this machine")
    quiet = subprocess.run([*run, ours], env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and CUDA_NOTICE not in quiet.stderr


def _tiny_onnx(folder):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.random.default_rng(0).random((8, 8), np.float32), "W"),
        numpy_helper.from_array(np.ones(8, np.float32), "ln.weight"),
        numpy_helper.from_array(np.zeros(8, np.float32), "ln.bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "ln.weight", "ln.bias"], ["y"], axis=-1),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "g", io[:1], io[1:], inits)
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _quantize_both(src, folder):
    ortq = pytest.importorskip("onnxruntime.quantization")

    class Reader(ortq.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": np.ones((1, 8), np.float32)}])

        def get_next(self):
            return next(self.it, None)

    qt = ortq.QuantType
    ortq.quantize_static(
        str(src),
        str(folder / "s.onnx"),
        Reader(),
        quant_format=ortq.QuantFormat.QDQ,
        per_channel=True,
        activation_type=qt.QUInt8,
        weight_type=qt.QInt8,
    )
    ortq.quantize_dynamic(str(src), str(folder / "d.onnx"), weight_type=qt.QInt8)


def test_ort_quantizer_advice_is_hidden_around_the_calls_only(tmp_path, caplog):
    from compactnn.bench.ort_quiet import quiet_ort_quantize

    src = _tiny_onnx(tmp_path)
    with caplog.at_level(logging.WARNING):
        _quantize_both(src, tmp_path)  # as the peers called it: the advice, on the root logger
    loud = caplog.text
    assert "Axis 1 is out-of-range for weight 'ln.weight' with rank 1" in loud
    assert "Please consider pre-processing before quantization" in loud
    assert "Please consider to run pre-processing before quantization" in loud
    caplog.clear()
    with caplog.at_level(logging.WARNING), quiet_ort_quantize():
        _quantize_both(src, tmp_path)
        logging.warning("Axis 1 of something else")  # other root records still pass
    assert [r.getMessage() for r in caplog.records] == ["Axis 1 of something else"]
    assert (tmp_path / "s.onnx").is_file() and (tmp_path / "d.onnx").is_file()
    assert not logging.getLogger().filters  # removed afterwards


def test_the_build_notice_does_not_promise_two_minutes(tmp_path, monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "load", lambda **kw: "built")
    with caplog.at_level(logging.WARNING, logger="compactnn"):
        assert bitconv._load_or_build("compactnn_bitconv_test", tmp_path) == "built"
    (message,) = [r.getMessage() for r in caplog.records if r.name == "compactnn"]
    assert message == (
        "compiling compactnn's CPU kernels (direct int8 and popcount) once (a few minutes, "
        f"longer on a busy machine) into {tmp_path}"
    )
