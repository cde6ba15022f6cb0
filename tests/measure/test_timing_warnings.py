"""Latency warnings name the timing they are about, each distinct text is said, and the CPU
share a warning prints agrees with the times printed beside it (tester session 36: a pruned
row's float-path race warned as bare ``fp32-eager``, the float model's own ``fp32-eager``
warnings were then swallowed, and "4.97 ms/call is 34% of the wall time (median 4.76 ms)")."""

from __future__ import annotations

import itertools
import re
import warnings

import pytest

from compactnn.measure import timing
from compactnn.measure.timing import Timing, suspect_reasons, time_fn

# the tester's two fp32-eager timings: a pruned row's own race, then the float model's
PRUNED = Timing(0.002, 0.0013, 0.0027, 10, 2, 2)  # spread (2.7 - 1.3) / 2 = 70%
FLOAT = Timing(0.009, 0.0029, 0.0193, 10, 2, 2)  # spread (19.3 - 2.9) / 9 = 182%


def _said(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    said = [str(w.message) for w in caught if issubclass(w.category, timing.TimingWarning)]
    return [s for s in said if s.startswith("latency of ")]  # not the wait-policy warning


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(timing, "_warned", set())


def test_two_timings_under_one_label_both_warn_with_their_own_numbers():
    def both():
        timing._warn_suspect(PRUNED, "fp32-eager")
        timing._warn_suspect(FLOAT, "fp32-eager")

    said = _said(both)
    assert len(said) == 2
    assert "runs spread 70% around the median (1.30-2.70 ms)" in said[0]
    assert "runs spread 182% around the median (2.90-19.30 ms)" in said[1]  # never swallowed


def test_an_identical_warning_is_said_once():
    said = _said(lambda: [timing._warn_suspect(FLOAT, "fp32-eager") for _ in range(3)])
    assert said == [f"latency of fp32-eager may be inflated: {suspect_reasons(FLOAT)[0]}"]


def test_a_timing_taken_for_another_model_names_that_model():
    def race_then_float():
        with timing.timing_owner("ch50-ft", "the race that picks its float path"):
            timing._warn_suspect(PRUNED, "fp32-eager")
        timing._warn_suspect(FLOAT, "fp32-eager")  # the float model's own: bare path name

    pruned, own = _said(race_then_float)
    assert pruned.startswith(
        "latency of ch50-ft's fp32-eager (the race that picks its float path) may be inflated: "
        "runs spread 70%"
    )
    assert own.startswith("latency of fp32-eager may be inflated: runs spread 182%")


def test_owners_nest_and_are_restored_after_an_error():
    with pytest.raises(RuntimeError), timing.timing_owner("outer"):
        with timing.timing_owner("inner"):
            assert timing.warning_label("x") == "inner's x"
        assert timing.warning_label("x") == "outer's x"
        raise RuntimeError
    assert timing.warning_label("x") == "x"


def _fake_clock(monkeypatch, walls: list[float], cpu_total: float) -> None:
    """``perf_counter`` pairs that time the calls at ``walls`` seconds, and a process that
    used ``cpu_total`` seconds of CPU over the whole block."""
    monkeypatch.setattr(timing, "check_environment", lambda: None)  # the machine's load: not here
    ticks = iter(itertools.chain.from_iterable((0.0, w) for w in walls))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    cpu = iter((0.0, cpu_total))
    monkeypatch.setattr(timing.time, "process_time", lambda: next(cpu))


def _numbers(reason: str) -> tuple[float, float, float]:
    """(CPU ms/call, share, wall ms) as a "waited for the CPU" reason prints them."""
    found = re.search(r"CPU time ([\d.]+) ms/call is (\d+)% of .*?([\d.]+) ms", reason)
    assert found, reason
    return float(found[1]), float(found[2]) / 100, float(found[3])


def test_a_few_slow_calls_do_not_read_as_a_call_that_waited(monkeypatch):
    # ev-w4a8's fp32-eager: calls of 10 ms computing 10 ms each, one call stalled 110 ms:
    # the mean wall time (30 ms) is three times the CPU, the median (the latency) is not
    _fake_clock(monkeypatch, [0.010, 0.010, 0.110, 0.010, 0.010], cpu_total=0.050)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", timing.TimingWarning)
        t = time_fn(lambda: None, warmup=0, runs=5, threads=1)
    assert (t.median_s, t.cpu_s) == pytest.approx((0.010, 0.010))
    assert t.cpu_share == pytest.approx(1.0)  # cpu_s / median_s: one core, as computed
    reasons = suspect_reasons(t)
    assert [r.split()[0] for r in reasons] == ["runs"]  # the spread says it, not "waited"


def test_a_waiting_call_prints_a_share_its_own_numbers_give(monkeypatch):
    _fake_clock(monkeypatch, [0.010] * 4, cpu_total=0.012)  # 3 ms of CPU per 10 ms call
    with pytest.warns(timing.TimingWarning, match="waited for the CPU"):
        t = time_fn(lambda: None, warmup=0, runs=4, threads=1, label="nap")
    (reason,) = suspect_reasons(t)
    cpu_ms, share, wall_ms = _numbers(reason)
    assert (cpu_ms, share, wall_ms) == (3.0, 0.3, 10.0)
    assert share == pytest.approx(cpu_ms / wall_ms, abs=0.005)  # what it prints agrees


def test_the_testers_recorded_timing_no_longer_contradicts_itself():
    # /tmp/s36/t4/w/ev-w4a8.json's fp32-eager: CPU 4.97 ms/call, median 4.76 ms, and the
    # block share it was judged by (34%), recorded before cpu_share meant cpu_s / median_s
    t = Timing(0.00476, 0.00448, 0.10912, 60, 2, 2, cpu_s=0.00497, cpu_share=0.34)
    for reason in suspect_reasons(t):
        if "CPU time" in reason:
            cpu_ms, share, wall_ms = _numbers(reason)
            assert share == pytest.approx(cpu_ms / wall_ms, abs=0.005)
    assert t.to_dict()["cpu_share"] == pytest.approx(0.00497 / 0.00476)
