"""Reports refuse artifacts of other float models (by the digest compress records), label
repeated recipes by folder, say when rows were calibrated on different data, and name the
data whose labels the model cannot score."""

from __future__ import annotations

import warnings

import pytest
import torch

import compactnn
from compactnn.core.provenance import state_sha256
from compactnn.errors import CompactnnError
from compactnn.report import build_report
from compactnn.report.any_model_table import _blocks, folder_labels
from compactnn.report.sources import (
    calibration_note,
    check_artifacts,
    check_float_model,
    given_as,
)
from tests.report._nets import X, cnn

Y = torch.arange(32) % 3


def _other() -> torch.nn.Module:
    net = cnn()
    with torch.no_grad():
        net[0].weight.mul_(1.5)
    return net


def _artifact(path, model, x=X) -> str:
    compactnn.save(compactnn.compress(model, "w8a8", calib_data=x, progress=False), path)
    return str(path)


def _header(digest: str | None) -> dict:
    return {"extra": {"float_model": {"sha256": digest, "tensors": 4}}} if digest else {}


def test_artifacts_made_in_python_from_other_weights_are_refused(tmp_path):
    a = _artifact(tmp_path / "one" / "w8a8", cnn())
    b = _artifact(tmp_path / "two" / "w8a8", _other())
    mine, theirs = state_sha256(cnn())[:16], state_sha256(_other())[:16]
    with pytest.raises(CompactnnError) as info:
        check_artifacts([a, b])
    msg = str(info.value)
    assert f"{a!r}: float-model SHA-256 {mine}...; {b!r}: {theirs}..." in msg
    assert "\n" not in msg
    with pytest.raises(CompactnnError) as info:  # build_report: before any measurement
        build_report([b], model=cnn(), data=(X, Y), out=tmp_path / "r", progress=False)
    msg = str(info.value)
    assert msg.startswith(f"artifact {b!r} was made from another float model (state SHA-256 ")
    assert f"{theirs}...) than the model given (SHA-256 {mine}...)" in msg
    assert not (tmp_path / "r").exists()


def test_the_float_model_check_names_the_command_line_model():
    source = {"model": "mynets:small_cnn", "weights": "/d/net2.safetensors"}
    assert given_as(source) == "--model mynets:small_cnn --weights net2.safetensors"
    with pytest.raises(CompactnnError, match="than --model mynets:small_cnn --weights net2"):
        check_float_model(["a"], [_header("0" * 64)], cnn(), given_as(source))


def test_artifacts_without_a_digest_warn_once_that_the_check_was_not_made():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filed = {"extra": {"source": {"model": "m:build", "weights_sha256": "c" * 64}}}
        check_float_model(["old", "new", "older", "cli"], [_header(None),
                          _header(state_sha256(cnn())), _header(None), filed], cnn())  # fmt: skip
    assert [str(w.message) for w in caught] == [
        "'old', 'older' record no float-model digest (made before compactnn recorded one): "
        "could not check that they were made from the model given."
    ]


def test_folder_labels_tell_artifacts_apart():
    assert folder_labels(["api_art/w8a8", "api_net2/w8a8"]) == ["api_art/w8a8", "api_net2/w8a8"]
    assert folder_labels(["out/w8a8", "out/w8a8-b"]) == ["w8a8", "w8a8-b"]


def test_calibration_note_only_when_the_data_differs():
    def h(samples, digest):
        rec = {"samples": samples, "batches": 1, "inputs_sha256": digest}
        return {"extra": {"calibration": rec}}

    assert calibration_note([("a", h(3, "ab" * 32)), ("b", h(3, "ab" * 32))]) is None
    note = calibration_note([("a", h(3, "ab" * 32)), ("b", h(64, "cd" * 32)), ("c", {})])
    assert note == (
        "Rows calibrated on different data: a: 3 samples in 1 batch (inputs SHA-256 "
        "abababab...); b: 64 samples in 1 batch (inputs SHA-256 cdcdcdcd...); c: not recorded."
    )


def test_a_report_labels_repeated_recipes_by_folder_and_notes_other_calibration(tmp_path):
    a = _artifact(tmp_path / "one" / "w8a8", cnn())
    b = _artifact(tmp_path / "two" / "w8a8", cnn(), X[:8])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = build_report([a, b], model=cnn(), data=(X, Y), out=tmp_path / "r", runs=1,
                               progress=False, quick=True)  # fmt: skip
    labels = [r["label"] for r in results["rows"] if r["runs_as"] == "simulated"]
    assert labels == ["w8a8 (one/w8a8)", "w8a8 (two/w8a8)"]
    note = results["calibration_note"]
    assert note.startswith("Rows calibrated on different data: w8a8 (one/w8a8): 32 samples in ")
    assert "w8a8 (two/w8a8): 8 samples in 1 batch" in note
    assert note in [str(w.message) for w in caught]
    assert note in (tmp_path / "r" / "report.md").read_text()
    assert ("p", note) in _blocks(results, b"", "t")


def test_labels_past_the_models_classes_name_the_data(tmp_path):
    a = _artifact(tmp_path / "a", cnn())
    bad = Y + 5
    with pytest.raises(CompactnnError) as info:
        build_report([a], model=cnn(), data=(X, bad), out=tmp_path / "r", progress=False,
                     data_name="--data bad_labels.safetensors")  # fmt: skip
    assert str(info.value).startswith(
        "--data bad_labels.safetensors: labels range over [5, 7] but the model has 3 outputs"
    )
