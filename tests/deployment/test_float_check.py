"""How deploy(backend="auto") times its candidates."""

from __future__ import annotations

import itertools
import time
import warnings

import torch

from compactnn.deployment import float_check
from compactnn.measure.timing import TimingWarning


class _Sleeper(torch.nn.Module):
    """A contender whose calls take ``pattern`` milliseconds in turn."""

    def __init__(self, pattern: list[float]) -> None:
        super().__init__()
        self.times = itertools.cycle(pattern)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(next(self.times) / 1e3)
        return x


def test_the_fastest_call_decides_not_a_median_that_interference_moved():
    """Interference only adds time: "steady" always takes 6 ms, "disturbed" 1 ms but 20 ms
    on two calls of three (its median is 20 ms). Its own speed is 1 ms: it wins (margins
    wide enough for a sleep that oversleeps on a busy CI machine)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        times = float_check.time_contenders(
            {"steady": _Sleeper([6.0]), "disturbed": _Sleeper([20.0, 1.0, 20.0])}, torch.zeros(1)
        )
    # the spread is the race's noise, not a latency anyone is shown: no "inflated" warning
    # (eval printed one for a backend auto did not pick)
    assert not [w for w in caught if issubclass(w.category, TimingWarning)]
    assert times["disturbed"] < times["steady"]
    assert 0.001 <= times["disturbed"] < 0.005 and times["steady"] >= 0.006


def test_the_hidden_race_leaves_the_later_timing_free_to_warn():
    """The race's warnings are hidden, so they must not count as said: the table timed after
    it warns for the same contender and reason (deploy marked fp32-eager ``*`` with no
    warning above to explain it)."""
    disturbed = _Sleeper([20.0, 2.0, 20.0])
    label = "fp32-eager (race probe)"  # a label no other test times: warned once per process
    float_check.time_contenders({label: disturbed}, torch.zeros(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        float_check.time_blocks(
            {label: float_check.model_call(disturbed, torch.zeros(1))},
            warmup=1, runs=6, threads=None, pause_s=0.0, block_s=0.0,
        )  # fmt: skip
    said = [str(w.message) for w in caught if issubclass(w.category, TimingWarning)]
    assert any(m.startswith(f"latency of {label} may be inflated: runs spread") for m in said)
