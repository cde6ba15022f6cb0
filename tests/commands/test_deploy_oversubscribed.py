"""``compactnn deploy``'s latency table says when --threads exceeds the CPUs the process may
use (the timings and speedups are then oversubscribed), as eval's and the report's do."""

from __future__ import annotations

import argparse
import types

import pytest

from compactnn.commands import deploy
from compactnn.measure import environment
from compactnn.measure.float_paths import FloatPaths
from compactnn.measure.timing import Timing


def _lines(threads: int, monkeypatch, cpus: int) -> list[str]:
    monkeypatch.setattr(environment, "available_cpus", lambda: cpus)
    t = Timing(1e-3, 1e-3, 1e-3, 10, 2, threads)
    paths = FloatPaths(
        timings={"fp32-eager": t, "deployed": Timing(5e-4, 5e-4, 5e-4, 10, 2, threads)}
    )
    args = argparse.Namespace(quick=True, runs=10, threads=threads)
    fake = types.SimpleNamespace(recommendation=None)
    return deploy._latency_lines(args, fake, paths, 8)


@pytest.mark.parametrize(("threads", "cpus", "said"), [(64, 2, True), (2, 2, False), (4, 8, False)])
def test_oversubscribed_line(threads, cpus, said, monkeypatch):
    lines = _lines(threads, monkeypatch, cpus)
    over = [x for x in lines if x.startswith("oversubscribed")]
    assert bool(over) is said
    if said:
        assert lines.index(over[0]) == 1  # right under the table's heading line
        assert f"{threads} threads on the {cpus} CPUs" in over[0]
