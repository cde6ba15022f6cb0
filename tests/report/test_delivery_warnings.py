"""The short race that picks a plain float row's own float path warns under that row's name,
and the float model's warnings under the same path name are still said (tester session 36:
``latency of fp32-eager may be inflated: runs spread 135%`` came from ch50-ft's race, and the
float model's own fp32-eager warnings, 1194% in results.json, were dropped)."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.measure import timing
from compactnn.measure.float_paths import EAGER, FloatPaths
from compactnn.report import delivery
from compactnn.report.delivery import deliver_float
from tests.report._nets import X, cnn


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "channel pruning skipped: 3 (the outputs)"
        return compactnn.compress(cnn(), "ch50", calib_data=X, progress=False)


def _napping_race(model, example, **kwargs):
    """A race whose one contender sleeps: it waits instead of computing, so it always warns."""
    t = timing.time_fn(lambda: time.sleep(0.005), warmup=0, runs=2, threads=1, label=EAGER)
    return model, FloatPaths({EAGER: t}, {})


def _said(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    said = [str(w.message) for w in caught if issubclass(w.category, timing.TimingWarning)]
    return [s for s in said if s.startswith("latency of ")]  # not the wait-policy warning


@pytest.fixture(autouse=True)
def _race(monkeypatch):
    monkeypatch.setattr(timing, "_warned", set())
    monkeypatch.setattr(delivery, "fastest_float_form", _napping_race)


def test_a_rows_race_warns_under_the_rows_name(pruned):
    said = _said(lambda: deliver_float(pruned, X[:4], threads=1, name="ch50-ft"))
    head = (
        "latency of ch50-ft's fp32-eager (the short race that picks its float path; its row "
        "is timed again beside the float model) may be inflated: "
    )
    assert said and all(s.startswith(head) for s in said)  # a sleep may spread its runs too
    assert any("waited for the CPU" in s for s in said)
    assert timing.warning_label(EAGER) == EAGER  # the name ends with the race


def test_without_a_name_the_recipe_names_the_row(pruned):
    assert compactnn.info_of(pruned)["recipe"].name == "ch50"
    said = _said(lambda: deliver_float(pruned, X[:4], threads=1))
    assert said and all(s.startswith("latency of ch50's fp32-eager (the short race") for s in said)
    plain = cnn()  # no compression record: named as what it is
    said = _said(lambda: deliver_float(plain, X[:4], threads=1))
    head = "latency of the compressed model's fp32-eager (the short race"
    assert said and all(s.startswith(head) for s in said)


def test_the_float_models_own_warning_follows_the_rows(pruned):
    def row_then_float():
        deliver_float(pruned, X[:4], threads=1, name="ch50-ft")
        with torch.no_grad():  # the float model's fp32-eager, timed after (as the report does)
            _napping_race(cnn(), X[:4])

    said = _said(row_then_float)
    row = [s for s in said if s.startswith("latency of ch50-ft's fp32-eager (")]
    own = [s for s in said if s.startswith("latency of fp32-eager may be inflated: ")]
    assert row and own and len(row) + len(own) == len(said)
    assert any("waited for the CPU" in s for s in own)  # said, though the row's said it too
