"""The latency protocol: warm-up calls untimed, median of the timed runs, threads restored."""

from __future__ import annotations

import itertools

import pytest
import torch

from compactnn.measure import timing
from compactnn.measure.timing import Timing, time_fn


def test_time_fn_counts_warmup_and_runs_and_takes_the_median(monkeypatch):
    calls = []
    # perf_counter pairs give durations 1, 5, 2, 4, 3 seconds -> median 3, min 1, max 5
    ticks = iter(itertools.chain.from_iterable((0, d) for d in (1, 5, 2, 4, 3)))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    t = time_fn(lambda: calls.append(1), warmup=2, runs=5, threads=1)
    assert len(calls) == 7
    assert (t.median_s, t.min_s, t.max_s, t.runs, t.warmup) == (3, 1, 5, 5, 2)
    assert t.threads == 1
    assert t.spread == pytest.approx(4 / 3)
    assert t.fmt() == "3000.00 ms (1000.00-5000.00)"


def test_threads_are_restored():
    before = torch.get_num_threads()
    time_fn(lambda: None, warmup=0, runs=1, threads=1)
    assert torch.get_num_threads() == before


def test_fmt_hides_min_max_when_tight():
    assert Timing(0.010, 0.0099, 0.0105, 10, 2, 2).fmt() == "10.00 ms"


def test_runs_must_be_positive():
    with pytest.raises(ValueError):
        time_fn(lambda: None, runs=0)
