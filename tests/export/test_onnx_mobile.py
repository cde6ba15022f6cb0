"""ONNX files ORT Mobile takes: its converter, in the runtime-optimization style used for
NNAPI / XNNPACK QDQ models, needs every ``DequantizeLinear`` of an int32 bias to carry its
(all-zero) zero point."""

from __future__ import annotations

import time
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import compactnn
from compactnn.export.onnx import export_onnx
from tests.export._conv_net import conv_net

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    calib = torch.randn(32, 3, 6, 6)
    qmodel = compactnn.compress(conv_net(), "w8a8", calib_data=calib, progress=False)
    path = tmp_path_factory.mktemp("mobile") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(qmodel, path, example=calib[:8])
    return path


def test_int32_bias_dequantize_has_an_all_zero_int32_zero_point(exported):
    graph = onnx.load(str(exported)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    biases = [
        n
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].dtype == np.int32
    ]
    assert len(biases) == 4  # two convolutions, two linears (the head's with int32_heads)
    for n in biases:
        assert len(n.input) == 3, n.name
        zero, scale = inits[n.input[2]], inits[n.input[1]]
        assert zero.dtype == np.int32 and zero.shape == scale.shape
        assert not zero.any()


def test_ort_mobile_runtime_style_conversion_succeeds(exported, tmp_path):
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    start = time.perf_counter()
    convert_onnx_models_to_ort(
        exported, output_dir=tmp_path, optimization_styles=[OptimizationStyle.Runtime]
    )
    assert list(tmp_path.glob("*.ort")), "no .ort file written"
    assert time.perf_counter() - start < 20
