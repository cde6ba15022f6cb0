"""Where a recipe comes from: a folder, an empty name, a file that is not YAML, and an
artifact whose recipe.yaml was replaced by a hostile one (hashes recomputed)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export import validate
from compactnn.recipe import resolve_recipe


def _error(recipe) -> str:
    with pytest.raises(CompactnnError) as exc:
        resolve_recipe(recipe)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_a_folder_with_a_recipe_names_the_file_to_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "recipe.yaml").write_text("name: x\nsteps: [{method: rtn}]\n")
    assert _error("art") == (
        "recipe 'art' is a folder, not a recipe: pass the recipe file in it, 'art/recipe.yaml'."
    )
    assert resolve_recipe("art/recipe.yaml").name == "x"


def test_a_folder_without_a_recipe_says_what_a_recipe_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").mkdir()
    (tmp_path / "d.yaml").mkdir()
    assert "'plain' is a folder, not a recipe: pass a recipe YAML file" in _error("plain")
    assert "'d.yaml' is a folder" in _error("d.yaml")


def test_a_short_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w8").mkdir()
    assert resolve_recipe("w8").name == "w8"


def test_an_empty_or_non_yaml_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _error("") == "recipe '' is empty: pass a short name such as w8a8 or a recipe YAML file."
    (tmp_path / "r.txt").write_text("name: x\n")
    assert "'r.txt' is not named .yaml or .yml" in _error("r.txt")


def test_an_unknown_short_name_names_the_forms_it_starts_like_on_one_line():
    with pytest.raises(CompactnnError, match="unknown recipe 'w5z'") as exc:
        resolve_recipe("w5z")
    assert "w<W>[a<A>[g|d]]" in str(exc.value) and "\n" not in str(exc.value)
    assert "`compactnn recipes`" in str(exc.value)


def _replace_recipe(root, text: str) -> None:
    (root / "recipe.yaml").write_text(text)
    header = json.loads((root / "compactnn.json").read_text())
    for f in header["files"].values():
        data = (root / f["name"]).read_bytes()
        f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    header["digest"] = ""
    header["digest"] = validate.header_digest(header)
    (root / "compactnn.json").write_text(json.dumps(header))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "name: x\nsteps:\n  - method: rtn\n    config: {weight: {bits: [&a0 [lol, lol], "
            + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9))
            + "]}}\n",
            "anchors and aliases",
        ),
        ("name: x\nsteps: " + "[" * 5000 + "]" * 5000 + "\n", "nested over 32 levels"),
    ],
    ids=["alias-bomb", "deep"],
)
def test_a_hostile_artifact_recipe_is_an_artifact_error(tmp_path, text, needle):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    compactnn.save(compactnn.compress(model, "w8", progress=False), tmp_path / "art")
    _replace_recipe(tmp_path / "art", text)
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match=needle) as exc:
        compactnn.load(tmp_path / "art", model=model)
    assert time.perf_counter() - start < 2.0
    assert "\n" not in str(exc.value)
