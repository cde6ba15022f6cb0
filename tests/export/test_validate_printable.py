"""Header strings that the commands print must not drive the terminal (forged artifacts)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import ArtifactError
from compactnn.export import validate

ESC = "\x1b]0;PWNED\x07\x1b[2J"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("printable") / "art"
    compactnn.save(compactnn.compress(_net(), "w8", progress=False), root)
    return root


def _forge(src, dst, edit, recipe_yaml=None):
    """Copy an artifact, edit its header, re-hash everything (as an attacker can)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    header = json.loads((dst / "compactnn.json").read_text())
    edit(header)
    if recipe_yaml is not None:
        data = recipe_yaml((dst / "recipe.yaml").read_text()).encode()
        (dst / "recipe.yaml").write_bytes(data)
        header["files"]["recipe"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    header["digest"] = validate.header_digest(header)
    (dst / "compactnn.json").write_text(json.dumps(header))
    return dst


def _refused(root, field):
    with pytest.raises(ArtifactError) as info:
        compactnn.load(root, model=_net())
    message = str(info.value)
    assert "\n" not in message and validate.control_char(message) is None
    assert field in message and "control character" in message
    return message


def _set(path, value):
    def edit(h):
        target = h
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "path, value, field",
    [
        (
            ("model_class",),
            "torch.nn.modules.container.Sequential" + ESC + "\nsecond",
            "model_class",
        ),
        (("float_layers", "1"), "kept" + ESC, "['float_layers']['1']"),
        (("extra", "notes"), ["fine", "bad\x9b2J"], "['extra']['notes'][1]"),  # a C1 CSI
        (("extra", "source"), {"deep": [{"x": "a\x00b"}]}, "['source']['deep'][0]['x']"),
        (("float_layers", "1" + ESC), "kept", "key"),
    ],
)
def test_a_header_string_with_a_control_character_is_refused(
    artifact, tmp_path, path, value, field
):
    message = _refused(_forge(artifact, tmp_path / "f", _set(path, value)), field)
    assert "\x1b" not in message and "\x07" not in message


def test_a_recipe_name_with_escapes_is_refused_in_header_and_yaml(artifact, tmp_path):
    name = "w8" + ESC
    both = _forge(
        artifact,
        tmp_path / "both",
        _set(("recipe",), name),
        lambda y: y.replace("name: w8", "name: " + json.dumps(name), 1),
    )
    _refused(both, "['recipe']")
    # the yaml alone forged (the header keeps the clean name): refused, the name quoted
    only_yaml = _forge(
        artifact,
        tmp_path / "yaml",
        lambda h: None,
        lambda y: y.replace("name: w8", "name: " + json.dumps(name), 1),
    )
    with pytest.raises(ArtifactError) as info:
        compactnn.load(only_yaml, model=_net())
    assert "\x1b" not in str(info.value) and "\\x1b" in str(info.value)


def test_notes_may_span_lines_and_clean_artifacts_load(artifact, tmp_path):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    root = _forge(artifact, tmp_path / "ok", _set(("extra", "notes"), ["line one\nline two"]))
    loaded = compactnn.load(root, model=_net())
    assert compactnn.info_of(loaded)["notes"] == ["line one\nline two"]
    assert torch.equal(loaded(x), compactnn.load(artifact, model=_net())(x))


def test_the_class_mismatch_message_quotes_the_saved_class(artifact, tmp_path):
    root = _forge(artifact, tmp_path / "cls", _set(("model_class",), "evil.Net\u2028x"))
    with pytest.raises(ArtifactError, match=r"holds a 'evil\.Net\\u2028x'"):
        compactnn.load(root, model=_net())


def test_control_char_names_the_first_one():
    assert validate.control_char("ab\x1b[2J\x07") == "U+001B"
    assert validate.control_char("tab\there") == "U+0009"
    assert validate.control_char("a\nb") == "U+000A"
    assert validate.control_char("a\nb", newline=True) is None
    assert validate.control_char("caf\u00e9 \u2028") is None
    assert validate.control_char("\x85") == "U+0085"
