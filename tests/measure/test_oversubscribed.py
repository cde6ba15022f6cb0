"""Timings taken with more threads than the process has CPUs say so (tester session 33:
``--threads 64`` on 2 CPUs labelled the table "64 threads", eager float doubled 12.3 ->
24.8 ms, and every speedup was computed under it, with no word on why)."""

import argparse
import os

import pytest

from compactnn.commands.eval_table import result_lines
from compactnn.measure.environment import available_cpus, environment, oversubscribed_note


@pytest.fixture
def two_cpus(monkeypatch):
    """A process that may run on CPUs 0 and 1 only (as under ``taskset -c 0,1``)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine has more: not the count


def test_the_note_appears_only_above_the_cpus_the_process_may_use(two_cpus):
    assert available_cpus() == 2
    assert oversubscribed_note(2) is None and oversubscribed_note(1) is None
    note = oversubscribed_note(64)
    assert note == (
        "oversubscribed: 64 threads on the 2 CPUs this process may use (os.sched_getaffinity): "
        "the threads wait for each other's cores, so these latencies and the speedups computed "
        "under them are not the model's; time with --threads 2 or fewer."
    )
    assert oversubscribed_note(3, cpus=4) is None and "3 threads on the 2" in oversubscribed_note(
        3, cpus=2
    )


def test_without_an_affinity_call_the_cpu_count_stands_in(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert available_cpus() == 4 and oversubscribed_note(4) is None
    assert oversubscribed_note(5).startswith("oversubscribed: 5 threads on the 4 CPUs")


def test_the_report_environment_carries_the_note_only_when_oversubscribed(two_cpus):
    assert "oversubscribed" not in environment(2)
    assert environment(64)["oversubscribed"] == oversubscribed_note(64)


def _result() -> dict:
    row = {"model": "float", "recipe": "float", "runtime": "PyTorch fp32", "metric": "top1",
           "quality": 98.5, "size_bytes": 1000, "latency_text": "24.80 ms"}  # fmt: skip
    return {
        "rows": [row], "notes": ["a note"], "stored_bits": {}, "batch": 16,
        "omp_wait_policy": "PASSIVE", "gomp_spincount": "unset", "float_paths": None,
    }  # fmt: skip


@pytest.mark.parametrize("threads", [64, 2])
def test_eval_says_its_timings_are_oversubscribed_under_the_thread_count(two_cpus, threads):
    args = argparse.Namespace(quick=True, runs=3, threads=threads)
    lines = result_lines(args, _result())
    at = next(i for i, line in enumerate(lines) if line.startswith("(latency: "))
    assert f"{threads} threads" in lines[at]
    over = [line for line in lines if line.startswith("oversubscribed: ")]
    if threads == 64:
        assert lines[at + 1] == oversubscribed_note(64) and len(over) == 1
    else:
        assert not over and lines[at + 1] == "notes:"
