"""Report files (the any-model and demo reports, the benchmark markdown) get the mode a
plain ``open()`` would give: ``0o666`` less the umask, not a fixed ``0o644``."""

from __future__ import annotations

import os
import stat
import sys
import types

import pytest

from compactnn.bench import __main__ as bench_main
from compactnn.report.writer import write_files


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o077, 0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_report_files_follow_the_umask(tmp_path, umask):
    paths = write_files(tmp_path / "r", {"rows": []}, [("h1", "t")], b"\x89PNG", "t")
    assert sorted(p.name for p in paths.values()) == [
        "pareto.png", "report.html", "report.md", "results.json",
    ]  # fmt: skip
    assert {p.name: _mode(p) for p in paths.values()} == {
        p.name: 0o666 & ~umask for p in paths.values()
    }


def test_benchmark_files_follow_the_umask(tmp_path, monkeypatch, umask):
    mod = types.ModuleType("fake_bench_mode")
    mod.run = lambda quick=False: "## Mode\n\nM"
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(bench_main, "SECTIONS", {"mode": "fake_bench_mode"})
    out = tmp_path / "benchmarks.md"
    assert bench_main.main(["--only", "mode", "--out", str(out)]) == 0
    assert _mode(out) == _mode(tmp_path / "bench" / "mode.md") == 0o666 & ~umask
