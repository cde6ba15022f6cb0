"""``compactnn.deploy`` warns on a collapsed model, as ``export_onnx`` and the CLI do."""

from __future__ import annotations

import warnings

import torch

import compactnn
from compactnn.core.collapse import CollapseWarning
from tests.export.test_onnx_file_checks import _collapsing_model


def _collapse_lines(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if issubclass(w.category, CollapseWarning)]


def test_deploy_of_a_collapsed_model_warns_once():
    model, x = _collapsing_model()
    qmodel = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    with torch.no_grad():  # the premise, checked independently
        out = qmodel(x[:8])
        assert bool((out == out[:1]).all()) and not bool((model(x[:8]) == model(x[:1])).all())
    lines = _collapse_lines(lambda: compactnn.deploy(qmodel, "onednn", example=x[:8]))
    assert len(lines) == 1 and "output is the same for all 8 samples" in lines[0]


def test_deploy_of_a_model_that_varies_does_not_warn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x = torch.randn(32, 4)
    qmodel = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    assert not _collapse_lines(lambda: compactnn.deploy(qmodel, "onednn", example=x[:8]))
