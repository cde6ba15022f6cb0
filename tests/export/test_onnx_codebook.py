"""Codebook weights (TTQ's {-a_n, 0, a_p}, TWN, INQ) in the QDQ ONNX file as int8 codes with
per-channel scales, one or two terms, instead of float weights behind float-op rounding."""

import warnings

import numpy as np
import pytest
import torch

import compactnn
from compactnn.export.onnx import export_onnx, to_onnx_bytes
from tests.export._conv_net import conv_net

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("recipe", ["w2a8-ttq", "w2a8-twn", "w4a8-inq"])
def test_codebook_layers_are_stored_as_int8_codes(recipe, tmp_path):
    calib = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(conv_net(), recipe, calib_data=calib, progress=False)
    data, kept = to_onnx_bytes(q, calib[:8])
    assert kept == {}  # was: every codebook layer "stored dequantized (float)"
    proto = onnx.load_from_string(data)
    inits = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer]
    weights = [p.numel() for n, p in q.named_parameters() if n.endswith("weight")]
    big_float = [a.size for a in inits if a.dtype == np.float32 and a.size >= min(weights)]
    assert big_float == []  # no float weight left (the smallest weight has 72 elements)
    assert not {"Div", "Round", "Clip"} & {n.op_type for n in proto.graph.node}
    result = export_onnx(q, tmp_path / "m.onnx", example=calib[:8])
    assert result.max_diff_steps < 1e-3, result
