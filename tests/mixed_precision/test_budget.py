"""The budget bookkeeping of a search: the ratio a latency budget is judged on, the verdict."""

import math

import pytest

from compactnn.mixed_precision.budget import latency_verdict, tighter_failure, worst_ratio


def test_the_larger_finite_ratio_counts():
    assert worst_ratio({"measured_ratio": 0.7, "cpu_ratio": 0.9}) == 0.9
    assert worst_ratio({"measured_ratio": 0.9, "cpu_ratio": float("nan")}) == 0.9
    assert worst_ratio({"measured_ratio": float("nan"), "cpu_ratio": 0.6}) == 0.6
    assert math.isnan(worst_ratio({}))


def test_verdict_and_why_the_rounds_stopped():
    check = {"reference": "w8a8", "measured_ratio": 0.85, "cpu_ratio": 0.5}
    assert latency_verdict(check, 0.9, None) == {"met": True, "measured_ratio": 0.85}
    stop = tighter_failure(4.5, 5.0)
    assert "4.5 ms had no solution" in stop and "fastest assignment is 5 ms" in stop
    assert "other limits" in tighter_failure(5.5, 5.0)
    with pytest.warns(UserWarning, match=r"NOT met: .*0\.85x w8a8 .*ratio 0\.8, and the re"):
        verdict = latency_verdict(check, 0.8, stop)
    assert verdict["met"] is False and stop in verdict["not_met"]
