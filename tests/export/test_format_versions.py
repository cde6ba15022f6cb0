"""An artifact of another format version is refused with what to do: the command that
re-creates an older one from its recipe and float model, an upgrade for a newer one."""

import hashlib
import json
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import ArtifactError
from compactnn.export import validate
from compactnn.export.versions import recreate_command, version_problem


def _saved(tmp_path, name="cnn-w4a4"):
    torch.manual_seed(0)
    conv = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*conv, nn.Flatten(), nn.Linear(512, 4))
    q = compactnn.compress(model, "w4a4", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    compactnn.save(q, tmp_path / name)
    return tmp_path / name, model


def _edit(root, edit):
    header = json.loads((root / "compactnn.json").read_text())
    edit(header)
    for f in header.get("files", {}).values():
        data = (root / f["name"]).read_bytes()
        f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    header["digest"] = validate.header_digest(header)  # as an edit that re-hashes
    (root / "compactnn.json").write_text(json.dumps(header))


def _as_v1(header, source):
    """What compactnn 0.1.0 of format version 1 wrote: no digest, no file list."""
    header["format_version"] = 1
    header["extra"]["source"] = source
    for key in ("digest", "files"):
        header.pop(key)


def test_a_version_1_artifact_gets_the_command_that_re_creates_it(tmp_path):
    root, model = _saved(tmp_path)
    header = json.loads((root / "compactnn.json").read_text())
    _as_v1(header, {"model": "mnist-cnn"})
    (root / "compactnn.json").write_text(json.dumps(header))
    with pytest.raises(ArtifactError) as err:
        compactnn.load(root, model=model)
    message = str(err.value)
    command = (
        f"compactnn compress mnist-cnn --recipe {shlex.quote(str(root / 'recipe.yaml'))} "
        f"--out {shlex.quote(str(tmp_path / 'cnn-w4a4-v2'))}"
    )
    assert "format version 1, from an older compactnn" in message
    assert command in message and "save it again" not in message
    assert "\n" not in message
    # the recipe it names is the artifact's own, and this compactnn reads it
    again = compactnn.resolve_recipe(str(root / "recipe.yaml"))
    assert again.to_yaml() == compactnn.resolve_recipe("w4a4").to_yaml()


@pytest.mark.parametrize(
    ("source", "extra", "want", "note"),
    [
        ({"model": "mnist-cnn"}, {}, "compactnn compress mnist-cnn --recipe", None),
        (
            {"model": "tiny-lm"},
            {"training": {"epochs": 3}},
            "compactnn train tiny-lm",
            "--epochs 3",
        ),
        (
            {"model": "pkg.mod:make", "weights": "/w/f.safetensors"},
            {},
            "compress MODULE:FUNCTION --weights FILE.safetensors --recipe",
            "'pkg.mod:make'",
        ),
        ({"model": "/data/hf-bert"}, {}, "compress MODEL --recipe", "'/data/hf-bert'"),
        (None, {}, "compress MODEL --recipe", "which it does not record"),
        ({"model": "\x1b[2Jevil"}, {}, "compress MODEL --recipe", "\\x1b[2Jevil"),
    ],
)
def test_the_command_names_only_what_the_header_allows(source, extra, want, note):
    header = {"format_version": 1, "recipe": "r", "extra": dict(extra)}
    if source is not None:
        header["extra"]["source"] = source
    text = version_problem(header, "old/a/compactnn.json", 2)
    assert want in text and "--out old/a-v2" in text
    assert note is None or note in text
    assert "\x1b" not in text  # a value from the file never reaches the terminal raw


def test_without_a_recipe_the_code_that_made_it_is_re_run():
    text = recreate_command({"recipe": None, "extra": {}}, Path("a"), 2)
    assert text.startswith("it records no recipe, so re-run the code that compressed it")


def test_a_newer_or_malformed_version_is_named_as_such(tmp_path):
    root, model = _saved(tmp_path)
    _edit(root, lambda h: h.update(format_version=3))
    with pytest.raises(
        ArtifactError,
        match=r"written by a newer compactnn \(format version 3; "
        r"this one reads 2\): upgrade compactnn to read it\.$",
    ):
        compactnn.load(root, model=model)
    for bad in ("2", True, 2.0, None):
        _edit(root, lambda h, bad=bad: h.update(format_version=bad))
        with pytest.raises(
            ArtifactError,
            match=r"which must be an integer \(this compactnn reads "
            r"2\): the header is damaged or was edited\.$",
        ):
            compactnn.load(root, model=model)
    _edit(root, lambda h: h.pop("format_version"))
    with pytest.raises(ArtifactError, match="has no format_version: the header is damaged"):
        compactnn.load(root, model=model)
    _edit(root, lambda h: h.update(format_version=2))
    compactnn.load(root, model=model)  # the current version still loads
