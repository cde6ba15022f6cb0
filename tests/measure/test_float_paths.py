"""The fastest float path: contenders checked against fp32 eager, timed side by side."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from compactnn.measure import float_paths
from compactnn.measure.float_paths import fastest_float_path


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).eval()


X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_contenders_agree_with_eager_and_the_fastest_wins():
    pytest.importorskip("onnxruntime")
    model = _model()
    with torch.no_grad():
        ref = model(X)
    paths = fastest_float_path(model, X, quick=True, threads=1, extra={"cheap": nn.Identity()})
    assert set(paths.timings) == {"fp32-eager", "bf16-autocast", "ort-fp32", "cheap"}
    assert paths.skipped == {"torch.compile": "not tried in quick mode"}
    floats = {k: t.median_s for k, t in paths.timings.items() if k != "cheap"}
    assert paths.winner == min(floats, key=floats.get)  # an extra model never wins
    assert paths.best is paths.timings[paths.winner] and paths.best.batch == 4
    # the errors are measured against an independent float computation
    ort_out = float_paths.ort_float(model, X, threads=1)(X)
    assert paths.errors["ort-fp32"] == pytest.approx(
        float((ort_out - ref).abs().max() / ref.abs().max()), abs=1e-7
    )
    assert paths.errors["ort-fp32"] <= 1e-3 and 0 < paths.errors["bf16-autocast"] <= 5e-2
    assert paths.to_dict()["winner"] == paths.winner


def test_a_diverging_contender_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(float_paths.TOLERANCE, "bf16-autocast", 0.0)  # bf16 cannot be exact
    monkeypatch.setattr(float_paths, "ort_float", _raise_import_error)
    paths = fastest_float_path(_model(), X, quick=True, threads=1, runs=1)
    assert set(paths.timings) == {"fp32-eager"} and paths.winner == "fp32-eager"
    assert paths.skipped["bf16-autocast"].startswith("diverges from fp32 eager: max difference")
    assert paths.skipped["ort-fp32"].startswith("not installed")


def _raise_import_error(*_a, **_k):
    raise ImportError("onnxruntime is not installed")


def test_compilation_is_bounded_in_time():
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="did not compile within"):
        float_paths.compiled(_model(), X, timeout_s=0.01)
    torch._dynamo.reset()
    assert time.perf_counter() - start < 30
