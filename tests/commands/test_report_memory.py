"""``compactnn report``'s resident memory column: each row's delivered form measured in a
fresh process (children that rebuild the user's float model from --model / --weights, never
from a pickle), or skipped with --no-memory."""

from __future__ import annotations

import importlib
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compactnn
from compactnn.cli import main
from compactnn.measure import memory
from compactnn.report import resident
from compactnn.report.any_model import build_report
from compactnn.report.any_model_table import RESIDENT
from compactnn.report.writer import resident_cell

NET = """
from torch import nn

class Net(nn.Module):  # the user's own class: a child rebuilds it from --model / --weights
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.body(x)

def make():
    return Net()
"""
ARGV = ["report", "w4", "--model", "f3_report_net:make", "--weights", "w.safetensors",
        "--data", "x.safetensors", "--runs", "1", "--quick", "--no-progress"]  # fmt: skip


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A factory module, its weights, inputs, and a weight-only artifact (no int8 row: two
    rows, float and simulated, measured by two children at once)."""
    (tmp_path / "f3_report_net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = importlib.import_module("f3_report_net").make().eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, tmp_path / "x.safetensors")
    compactnn.save(compactnn.compress(model, "w4", calib_data=x, progress=False), tmp_path / "w4")
    return tmp_path


@pytest.fixture
def spy(monkeypatch):
    """The real ``resident_memory``, its calls recorded; the children preload compactnn
    only (the full list adds ~10 s of imports per child, the same for every row)."""
    calls, real = [], memory.resident_memory

    def measured(builder, args, **kw):
        calls.append((args, kw["setup_args"]))
        return real(builder, args, **kw)

    monkeypatch.setattr(memory, "resident_memory", measured)
    monkeypatch.setattr(resident, "installed_preload", lambda: ("compactnn",))
    return calls


def test_cli_report_measures_each_rows_delivered_form_in_a_fresh_process(project, spy, capsys):
    assert main([*ARGV, "--out", "rep"]) == 0
    out = capsys.readouterr().out
    results = json.loads((project / "rep" / "results.json").read_text())
    rows = {r["label"]: r for r in results["rows"]}
    assert list(rows) == ["float", "w4"] and rows["w4"]["runs_as"] == "simulated"
    jobs = {args[1]: (args, setup_args) for args, setup_args in spy}
    assert sorted(jobs) == ["as-is", "float"]
    (float_args, float_setup), (w4_args, w4_setup) = jobs["float"], jobs["as-is"]
    assert float_args[2] == results["float_paths"]["winner"] and float_setup[1] is None
    assert w4_args[0] == str(project / "w4") and w4_setup[1] == float_args[0]
    assert float_args[0].endswith(".safetensors") and float_setup[0].endswith(".safetensors")
    for row in rows.values():  # a tiny model: more than nothing, far below torch's own maps
        assert 0 < row["resident_bytes"] < 200 * 2**20, row
        assert not any("resident memory not measured" in n for n in row["notes"])
        assert re.search(rf"{re.escape(row['runs_as'])}\s.*{re.escape(resident_cell(row))}", out)
    assert RESIDENT in out.splitlines()[0]
    md = (project / "rep" / "report.md").read_text()
    assert "Resident memory: resident MiB of the delivered form, fresh process" in md
    assert results["environment"]["memory_s"] >= 0


def test_no_memory_skips_the_children_and_says_so(project, spy, capsys):
    assert main([*ARGV, "--out", "rep", "--no-memory"]) == 0
    out = capsys.readouterr().out
    results = json.loads((project / "rep" / "results.json").read_text())
    assert spy == [] and results["environment"]["memory_s"] is None
    assert all("resident_bytes" not in r for r in results["rows"])
    assert all(line.rstrip().endswith(" -") for line in out.splitlines()[1:3])
    md = (project / "rep" / "report.md").read_text()
    assert "Resident memory: not measured (`--no-memory`" in md


class Local(nn.Module):  # defined here: no trusted constructor rebuilds it, and no MODEL named
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)


def test_a_float_model_no_child_can_rebuild_gets_a_note_not_a_pickle(tmp_path, spy):
    torch.manual_seed(0)
    model, x = Local().eval(), torch.randn(32, 16)
    compactnn.save(compactnn.compress(model, "w4", calib_data=x, progress=False), tmp_path / "a")
    results = build_report([tmp_path / "a"], model=model, data=x, out=tmp_path / "r", runs=1,
                           quick=True, progress=False, memory=True)  # fmt: skip
    assert spy == [] and len(results["rows"]) == 2
    for row in results["rows"]:
        assert "resident_bytes" not in row
        (note,) = [n for n in row["notes"] if n.startswith("resident memory not measured")]
        assert "cannot be rebuilt in a fresh process without unpickling" in note
        assert "Local is a" in note and "pass the MODEL it came from" in note
