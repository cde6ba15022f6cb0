"""docs/own_model_tutorial.py runs end to end and prints the numbers of docs/own-model.md."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compactnn.report.any_model_table import table_rows
from compactnn.report.delivery import FLOAT_PATH_NAMES

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _tutorial():
    spec = importlib.util.spec_from_file_location(
        "own_model_tutorial", DOCS / "own_model_tutorial.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Training is deterministic on one machine, but float arithmetic (and so one epoch of Adam)
# differs between CPUs (AVX-512, AMX): quality may move by a few of the 364 test digits, and
# a pruned model's sparse encoding (chosen per tensor by size) by a few bytes.
TOLERANCE_PT = 3.0


def _number(cell: str) -> float:
    """The first number of a table cell ("85.71%", "+0.55 pt", "10.70 MiB", "3.99x")."""
    return float(re.search(r"[-+]?[\d.]+", cell).group())


def _close(a: str, b: str) -> bool:
    """Two quality cells within TOLERANCE_PT points."""
    return abs(_number(a) - _number(b)) <= TOLERANCE_PT


def _doc_rows(doc: str) -> dict[str, list[str]]:
    """The Results table of the page: label -> cells up to "x smaller" (latency varies)."""
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and re.match(r"[\d.]+%", cells[2]):
            rows[cells[0]] = cells[:6]
    return rows


FLOAT_ROW_NAMES = {"fp32 eager", *FLOAT_PATH_NAMES.values()}
INT8_RUNTIMES = {"oneDNN int8", "ONNX Runtime int8"}


def test_tutorial_commands_are_the_page_s_and_skip_the_memory_column():
    doc = (DOCS / "own-model.md").read_text()
    cmds = _tutorial().commands(progress=False)
    for cmd in cmds:  # every command line of the script is on the page, as written there
        assert cmd.replace("compactnn ", "", 1).split(" --no-progress")[0] in doc, cmd
    report = [cmd for cmd in cmds if cmd.startswith("compactnn report ")]
    # the resident memory column alone took minutes of a loaded 2-core machine
    assert len(report) == 1 and "--no-memory" in report[0].split(), report


@pytest.mark.slow
def test_tutorial_prints_the_documented_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    previous = torch.get_num_threads()
    try:
        assert _tutorial().main(["--no-progress"]) == 0
    finally:
        torch.set_num_threads(previous)
        sys.modules.pop("digitnet", None)
    printed = capsys.readouterr().out
    doc = (DOCS / "own-model.md").read_text()
    pattern = r"float top-1 after 1 epoch: ([\d.]+)%"
    assert _close(re.search(pattern, printed).group(1), re.search(pattern, doc).group(1))
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    measured = {row[0]: row[:6] for row in table_rows(results)}
    documented = _doc_rows(doc)
    assert measured.keys() == documented.keys()
    for label, row in measured.items():  # quality within TOLERANCE_PT, sizes within 1%
        doc_row = documented[label]
        if label == "float" or doc_row[1] in FLOAT_ROW_NAMES:  # the float row, a pruned row:
            assert row[1] in FLOAT_ROW_NAMES, row  # the fastest float path of this run
        else:  # deploy(auto) keeps the faster verified backend of this machine's run
            assert row[0] == doc_row[0], (row, doc_row)
            assert row[1] == doc_row[1] or {row[1], doc_row[1]} <= INT8_RUNTIMES, (row, doc_row)
        assert _close(row[2], doc_row[2]) and _close(row[3], doc_row[3]), (row, doc_row)
        for got, want in zip(row[4:6], doc_row[4:6], strict=True):
            assert abs(_number(got) / _number(want) - 1) <= 0.01, (row, doc_row)
    for row in measured.values():  # the CLI printed the same rows
        assert re.search(r"\s+".join(map(re.escape, row)), printed), row
    for cmd in _tutorial().commands(progress=True):
        assert cmd.replace("compactnn ", "", 1).split(" --no-progress")[0] in doc
    # the real command line, as a separate process, reports the same w8a8 rows
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    argv = [sys.executable, "-m", "compactnn.cli", "report", "art/w8a8", "--model",
            "digitnet:build", "--weights", "digitnet.safetensors", "--data", "test.safetensors",
            "--out", "report1", "--runs", "1", "--quick", "--no-progress",
            "--no-memory"]  # fmt: skip
    # --quick: no torch.compile in the float race (a minute or more on a loaded machine, where
    # a 120 s limit timed out); the rows checked below do not depend on it
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for label in ("w8a8", "w8a8 int8"):
        assert re.search(_row_pattern(measured[label]), proc.stdout), label


def _row_pattern(row: list[str]) -> str:
    """A printed row; the int8 runtime is whichever backend that run timed faster."""
    cells = [
        "(?:" + "|".join(map(re.escape, sorted(INT8_RUNTIMES))) + ")"
        if cell in INT8_RUNTIMES
        else re.escape(cell)
        for cell in row
    ]
    return r"\s+".join(cells)
