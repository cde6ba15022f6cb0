"""Whether the resident-memory child may unpickle the user's ``.pt`` MODEL comes only from
the parent's own arguments, never from the files in the folder the child reads
(:func:`compactnn.report.plain_model.rebuild_float`, :func:`compactnn.report.resident.job`)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

import compactnn
from compactnn.measure import memory
from compactnn.measure.memory import ResidentMemory
from compactnn.report import resident
from compactnn.report.plain_model import RECORD, _write, rebuild_float, save_batch
from tests.report._nets import X, cnn


class _Marker:
    """Unpickling it touches ``path``: proof that the file was unpickled."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def _forged(tmp_path, model_file: str, trust: bool = True) -> tuple[str, str]:
    """A float record on the ``"source"`` route whose file says ``trust_pickle`` (as an
    attacker who can write the folder would), and a batch."""
    model = cnn()
    record = {
        "route": "source",
        "source": {"model": model_file, "weights": None, "trust_pickle": trust},
        "aliases": {},
    }
    path = tmp_path / "float.safetensors"
    _write(path, {k: v.clone() for k, v in model.state_dict().items()}, RECORD, record)
    save_batch(tmp_path / "batch.safetensors", X[:4])
    return str(path), str(tmp_path / "batch.safetensors")


def test_a_record_saying_trust_pickle_does_not_unpickle_without_the_parents_grant(tmp_path):
    marker = tmp_path / "unpickled"
    pt = tmp_path / "model.pt"
    torch.save(_Marker(marker), pt)
    path, batch = _forged(tmp_path, str(pt))
    with pytest.raises(ValueError, match="which the parent did not pass"):
        rebuild_float(path)
    with pytest.raises(ValueError, match="which the parent did not pass"):
        resident.setup(batch, path)
    refused = {"model": str(pt), "weights": None, "trust_pickle": False}
    with pytest.raises(compactnn.CompactnnError, match=r"refusing to load .*--trust-pickle"):
        rebuild_float(path, refused)
    assert not marker.exists()


def test_the_parents_source_is_what_the_child_rebuilds(tmp_path):
    """With the parent's grant, its MODEL is the one rebuilt (not the record's)."""
    model = cnn()
    pt = tmp_path / "model.pt"
    torch.save(model, pt)
    path, _ = _forged(tmp_path, str(tmp_path / "elsewhere.pt"), trust=False)
    rebuilt = rebuild_float(path, {"model": str(pt), "weights": None, "trust_pickle": True})
    with torch.no_grad():
        assert torch.equal(rebuilt(X[:4]), model(X[:4]))


def test_the_source_travels_on_the_childs_command_line(monkeypatch):
    calls = []

    def fake(builder, args, **kw):
        calls.append((args, kw))
        return ResidentMemory(before=1, after=2, peak=2)

    monkeypatch.setattr(memory, "resident_memory", fake)
    source = {"model": "/m.pt", "weights": None, "trust_pickle": True, "other": 1}
    job = resident.job("art", "as-is", None, ("f.safetensors", "b.safetensors"), source)
    assert job["source"] == {"model": "/m.pt", "weights": None, "trust_pickle": True}
    resident.measure_job(job, 1)
    plain = resident.job("art", "as-is", None, ("f.safetensors", "b.safetensors"))
    resident.measure_job(plain, 1)
    assert calls[0][1]["setup_args"] == ["b.safetensors", "f.safetensors", job["source"]]
    assert calls[1][1]["setup_args"] == ["b.safetensors", "f.safetensors"]
    assert json.dumps(calls[0][1]["setup_args"])  # JSON for the child's argv


def test_a_child_given_no_grant_does_not_unpickle_a_forged_record(tmp_path):
    """End to end: the float row's child reads a record saying ``trust_pickle: true`` while
    the parent passed none; the row gets a note and the pickle never runs."""
    marker = tmp_path / "unpickled"
    pt = tmp_path / "model.pt"
    torch.save(_Marker(marker), pt)
    inputs = _forged(tmp_path, str(pt))
    fields, note = resident.measure_job(resident.job("", "float", "fp32-eager", inputs), 1)
    assert fields == {} and note.startswith("resident memory not measured: CompactnnError")
    assert not marker.exists()
