"""``compactnn eval`` and reports say when the scored inputs are the artifact's own
calibration inputs (the digest compress records in ``extra.calibration``): a score on the
data the activation ranges were fitted to may be flattered."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.core.calib import as_batches
from compactnn.core.provenance import calibration_summary, scored_on_calibration
from compactnn.report import build_report
from compactnn.report.sources import own_calibration_note
from tests.report._nets import X, cnn

Y = torch.arange(32) % 3
NOTE = (
    "scored on the artifact's own calibration inputs ({n} samples): the score may be "
    "flattered; score held-out data"
)


def _record(model: torch.nn.Module, x) -> dict:
    """What compress itself records of calibration data ``x`` (the independent reference)."""
    q = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    return compactnn.info_of(q)["extra"]["calibration"]


def test_the_scored_inputs_match_the_digest_compress_recorded():
    x = torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    record = _record(cnn(), x)  # 4 batches of 32, 32, 32, 4
    assert (record["samples"], record["batches"]) == (100, 4)
    assert scored_on_calibration(record, x)
    assert scored_on_calibration(record, x.clone())  # the values, not the object
    assert scored_on_calibration(record, x.double(), torch.float32)  # a float64 file, cast
    assert not scored_on_calibration(record, x.double())  # uncast: other bytes
    assert not scored_on_calibration(record, x[:99])  # fewer samples
    assert not scored_on_calibration(record, x.flip(0))  # same samples, other order
    bumped = x.clone()
    bumped[57, 0, 3, 3] += 1e-3
    assert not scored_on_calibration(record, bumped)  # one value differs
    assert not scored_on_calibration(record, torch.cat([x[:50], x[:50]]))


def test_calibration_batched_by_a_loader_matches_too():
    x = torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for size in (64, 10, 100, 7):  # a DataLoader's batches (the last one shorter)
        record = _record(cnn(), list(x.split(size)))
        assert record["batches"] == -(-100 // size)
        assert scored_on_calibration(record, x), size
    uneven = _record(cnn(), [x[:50], x[50:60], x[60:]])  # no one batch size: not recognised
    assert not scored_on_calibration(uneven, x)


def test_keyword_inputs_match_as_compress_batches_them():
    g = torch.Generator().manual_seed(3)
    ids = {"input_ids": torch.randint(0, 50, (70, 6), generator=g),
           "attention_mask": torch.ones(70, 6, dtype=torch.long)}  # fmt: skip
    record = calibration_summary(as_batches(ids))  # as _compress records them: 32, 32, 6
    assert scored_on_calibration(record, ids)
    assert scored_on_calibration(record, dict(reversed(list(ids.items()))))  # key order
    other = {**ids, "input_ids": ids["input_ids"].roll(1, 0)}
    assert not scored_on_calibration(record, other)


@pytest.mark.parametrize("record", [None, {}, {"samples": 32, "batches": 1}, "x"])
def test_no_usable_record_is_no_match(record):
    assert not scored_on_calibration(record, X)


def test_the_note_names_the_samples_and_the_way_out():
    extra = {"calibration": _record(cnn(), X)}
    assert own_calibration_note(extra, X, cnn()) == NOTE.format(n=32)
    assert own_calibration_note(extra, X + 1, cnn()) is None
    assert own_calibration_note({}, X, cnn()) is None


def _artifact(path, x) -> str:
    compactnn.save(compactnn.compress(cnn(), "w8a8", calib_data=x, progress=False), path)
    return str(path)


def test_a_report_notes_rows_scored_on_their_own_calibration_inputs(tmp_path):
    held = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    own, other = (
        _artifact(tmp_path / "own" / "w8a8", X),
        _artifact(tmp_path / "held" / "w8a8", held),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows calibrated on different data; timing
        results = build_report([own, other], model=cnn(), data=(X, Y), out=tmp_path / "r",
                               runs=1, progress=False, quick=True)  # fmt: skip
    assert results["scored_on_calibration"] == ["w8a8 (own/w8a8)"]
    row = next(r for r in results["rows"] if r["label"] == "w8a8 (own/w8a8)")
    assert NOTE.format(n=32) in row["notes"]
    others = [n for r in results["rows"] if r is not row for n in r["notes"]]
    assert not any("own calibration" in n for n in others)  # the held-out row, the float one
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["scored_on_calibration"] == ["w8a8 (own/w8a8)"]
    assert f"w8a8 (own/w8a8): {NOTE.format(n=32)}" in (tmp_path / "r" / "report.md").read_text()


FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
"""


def test_eval_notes_scoring_on_the_calibration_inputs(tmp_path, monkeypatch, capsys):
    (tmp_path / "calib_scored_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import calib_scored_factory

    model = calib_scored_factory.make().eval()
    save_file(model.state_dict(), "w.safetensors")
    g = torch.Generator().manual_seed(5)
    x, held = torch.randn(40, 1, 8, 8, generator=g), torch.randn(40, 1, 8, 8, generator=g)
    save_file({"x": x}, "calib.safetensors")
    save_file({"x": x, "y": torch.arange(40) % 3}, "calib_lab.safetensors")
    save_file({"x": held, "y": torch.arange(40) % 3}, "held.safetensors")
    compactnn.save(compactnn.compress(model, "w8a8", calib_data=x, progress=False), "art")
    args = ["eval", "art", "--model", "calib_scored_factory:make", "--weights", "w.safetensors",
            "--quick", "--runs", "1", "--no-progress"]  # fmt: skip
    note = NOTE.format(n=40)
    runs = [("calib_lab.safetensors", []), ("calib.safetensors", ["--simulated"])]
    for data, how in runs:  # labelled and deployed, or inputs alone and simulated
        assert main([*args, *how, "--data", data, "--json", f"{data}.json"]) == 0
        assert note in capsys.readouterr().out
        result = json.loads((tmp_path / f"{data}.json").read_text())
        assert note in result["notes"] and result["scored_on_calibration"] is True
    assert main([*args, "--simulated", "--data", "held.safetensors", "--json", "held.json"]) == 0
    assert "own calibration" not in capsys.readouterr().out
    result = json.loads((tmp_path / "held.json").read_text())
    assert result["scored_on_calibration"] is False
    assert not any("own calibration" in n for n in result["notes"])
