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


def test_time_blocks_runs_each_contender_in_rotating_blocks(monkeypatch):
    monkeypatch.setattr(timing.time, "sleep", lambda _s: order.append("|"))
    order: list[str] = []
    calls = {k: (lambda k=k: order.append(k)) for k in ("a", "b", "c")}
    t = timing.time_blocks(calls, warmup=1, runs=6, threads=1, rounds=3, batch=4)
    # warm-up once each, then 3 rounds of 2-call blocks, a pause before every block
    assert "".join(order) == "abc" + "|aa|bb|cc" + "|bb|cc|aa" + "|cc|aa|bb"
    assert all(x.runs == 6 and x.batch == 4 and x.threads == 1 for x in t.values())


def test_a_call_that_waits_instead_of_computing_is_flagged():
    with pytest.warns(timing.TimingWarning, match="waited for the CPU"):
        t = time_fn(lambda: timing.time.sleep(0.02), warmup=0, runs=3, threads=1, label="nap")
    assert t.cpu_s < 0.01 <= t.median_s and t.cpu_share < 0.5  # sleeping costs no CPU
    assert any("waited for the CPU" in r for r in t.to_dict()["suspect"])


def test_suspect_rules_on_hand_made_timings():
    steady = Timing(0.010, 0.0095, 0.0110, 9, 2, 2, cpu_s=0.015, cpu_share=1.5)  # 1.5 of 2
    assert timing.suspect_reasons(steady) == []
    noisy = Timing(0.010, 0.008, 0.016, 9, 2, 2, cpu_s=0.015, cpu_share=1.5)  # spread 80%
    assert timing.suspect_reasons(noisy)[0].startswith("runs spread 80%")
    crowded = Timing(0.010, 0.010, 0.010, 9, 2, 2, cpu_s=0.035, cpu_share=3.5)  # 3.5 cores
    assert "another thread pool" in timing.suspect_reasons(crowded)[0]
    tiny = Timing(1e-5, 1e-5, 9e-5, 9, 2, 2, cpu_s=1e-4, cpu_share=9.0)  # sub-ms: not judged
    assert timing.suspect_reasons(tiny) == []


def test_wait_policy_warning_only_on_an_overloaded_machine(monkeypatch):
    monkeypatch.setattr(timing, "_warned", set())
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert timing.check_environment(load=9.0) is None
    monkeypatch.delenv("GOMP_SPINCOUNT")
    assert timing.check_environment(load=9.0) is None  # a bare PASSIVE: right under load
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert timing.check_environment(load=1.5) is None  # not overloaded
    with pytest.warns(timing.TimingWarning, match="OMP_WAIT_POLICY is unset .* load \\(9.0\\)"):
        timing.check_environment(load=9.0)
    assert ("policy", "") in timing._warned  # once per process


def test_a_spin_on_an_overloaded_machine_warns(monkeypatch):
    """PASSIVE with 20,000 spins at load 6-9 on 2 CPUs made eager float 10-100x slower."""
    monkeypatch.setattr(timing, "_warned", set())
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", timing.PASSIVE_SPINCOUNT)
    assert timing.check_environment(load=1.5) is None  # below the CPU count: the spin helps
    with pytest.warns(timing.TimingWarning, match="GOMP_SPINCOUNT is 20000 .* load \\(9.0\\)"):
        timing.check_environment(load=9.0)


def test_timings_record_their_conditions():
    t = timing.time_model(torch.nn.Linear(3, 2), torch.ones(5, 3), warmup=1, runs=2, threads=1)
    assert t.batch == 5 and t.threads == 1
    assert t.omp_wait_policy == timing.omp_wait_policy() and t.cpu_s is not None
    assert t.conditions().startswith("1 threads, batch 5, OMP_WAIT_POLICY=")


def test_block_s_grows_a_fast_contenders_blocks_and_keeps_a_slow_ones(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(timing.time, "sleep", lambda _s: None)

    def call(seconds):
        return lambda: clock.__setitem__(0, clock[0] + seconds)

    calls = {"fast": call(0.004), "slow": call(0.5), "tiny": call(1e-5)}
    with pytest.warns(timing.TimingWarning):  # a fake clock looks like waiting, not computing
        t = timing.time_blocks(calls, warmup=2, runs=3, threads=1, rounds=3, block_s=0.1)
    # 0.1 s / 4 ms = 25 calls a block; the slow one keeps runs / rounds = 1; capped at 30
    assert (t["fast"].runs, t["slow"].runs, t["tiny"].runs) == (75, 3, 3 * timing.MAX_BLOCK_CALLS)
    assert t["fast"].median_s == pytest.approx(0.004)


def test_a_bare_passive_policy_on_several_threads_warns_once(monkeypatch):
    monkeypatch.setattr(timing, "_warned", set())
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: 1)
    assert timing.check_environment(load=0.0) is None  # one thread: nothing to wake
    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: 2)
    with pytest.warns(timing.TimingWarning, match="GOMP_SPINCOUNT=20000 as well"):
        timing.check_environment(load=0.0)
    monkeypatch.setattr(timing, "_warned", set())
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    assert timing.check_environment(load=9.0) is None  # busy: the bare PASSIVE is right
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")  # the user's own spin count: their choice
    monkeypatch.setattr(timing, "_warned", set())
    assert timing.check_environment(load=0.0) is None
