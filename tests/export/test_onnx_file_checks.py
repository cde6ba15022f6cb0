"""What ``export_onnx`` writes over and what it says: ``force=True`` replaces only an earlier
ONNX export (as ``compactnn export`` does), and a model whose simulated output collapsed to
one value is written with the collapse warning that deploy and eval give."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export.onnx import export_onnx
from compactnn.measure.fidelity import CollapseWarning
from tests.export._conv_net import conv_net

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def qnet():
    torch.manual_seed(0)
    calib = torch.randn(32, 3, 6, 6)
    return compactnn.compress(conv_net(), "w8a8", calib_data=calib, progress=False), calib


def _user_files(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({"w": torch.ones(4)}, str(ckpt))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    return {ckpt: ckpt.read_bytes(), notes: notes.read_bytes()}


def test_force_refuses_a_file_that_is_not_an_earlier_onnx_export(qnet, tmp_path):
    qmodel, calib = qnet
    for path, before in _user_files(tmp_path).items():
        with pytest.raises(CompactnnError) as info:
            export_onnx(qmodel, path, example=calib[:4], force=True)
        message = str(info.value)
        assert "\n" not in message and repr(str(path)) in message
        assert "replaces only an earlier ONNX export" in message
        assert path.read_bytes() == before  # untouched
    with pytest.raises(CompactnnError, match=r"ckpt\.safetensors' exists and is a safetensors"):
        export_onnx(qmodel, tmp_path / "ckpt.safetensors", example=calib[:4], force=True)
    old = tmp_path / "old.onnx"
    export_onnx(qmodel, old, example=calib[:4])
    export_onnx(qmodel, old, example=calib[:4], force=True)  # an earlier export: replaced


def _collapsing_model() -> tuple[nn.Module, torch.Tensor]:
    """A linear layer that reads its small features only through an input grid whose step
    the large first feature sets: every small value rounds to zero, and the one feature that
    survives has a zero weight, so the quantized output is the bias for every sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0
    x = torch.randn(32, 4)
    x[:, 0] *= 1000.0
    return model, x


def test_collapsed_model_warns_like_deploy_and_eval(tmp_path):
    model, x = _collapsing_model()
    qmodel = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    with torch.no_grad():  # the premise, checked independently of the export
        out = qmodel(x[:8])
        assert bool((out == out[:1]).all()) and not bool((model(x[:8]) == model(x[:1])).all())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        export_onnx(qmodel, tmp_path / "c.onnx", example=x[:8])
    lines = [str(w.message) for w in seen if issubclass(w.category, CollapseWarning)]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "output is the same for all 8 samples" in lines[0] and "collapsed" in lines[0]


def test_a_model_that_varies_gives_no_collapse_warning(qnet, tmp_path):
    qmodel, calib = qnet
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        export_onnx(qmodel, tmp_path / "m.onnx", example=calib[:8])
    assert not [w for w in seen if issubclass(w.category, CollapseWarning)]
