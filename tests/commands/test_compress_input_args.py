"""``compactnn compress`` argument messages: an empty --out or MODEL, a recipe folder, and a
model file of a kind MODEL does not take are one line each."""

from __future__ import annotations

from safetensors.torch import save_file
from torch import nn

from tests.commands._compress_cli import assert_one_error_line

NET = (
    "import torch\nfrom torch import nn\n\ndef make():\n    return nn.Sequential(nn.Linear(8, 4))\n"
)


def _project(tmp_path, monkeypatch):
    (tmp_path / "argsnet.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    save_file(nn.Sequential(nn.Linear(8, 4)).state_dict(), "w.safetensors")
    return ["argsnet:make", "--weights", "w.safetensors"]


def test_an_empty_out_is_refused_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    model = _project(tmp_path, monkeypatch)
    assert_one_error_line(
        capsys, ["compress", *model, "-r", "w8", "-o", ""], "--out '' is an empty path"
    )
    assert not (tmp_path / "out").exists()


def test_an_empty_model_says_so(tmp_path, capsys, monkeypatch):
    _project(tmp_path, monkeypatch)
    assert_one_error_line(capsys, ["compress", "", "-r", "w8", "-o", "a"], "MODEL '' is empty")


def test_a_recipe_folder_names_its_recipe_file(tmp_path, capsys, monkeypatch):
    model = _project(tmp_path, monkeypatch)
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "recipe.yaml").write_text("name: x\nsteps: [{method: rtn}]\n")
    assert_one_error_line(
        capsys, ["compress", *model, "-r", "art", "-o", "a"], "is a folder", "'art/recipe.yaml'"
    )


def test_a_bad_recipe_yaml_is_one_line(tmp_path, capsys, monkeypatch):
    model = _project(tmp_path, monkeypatch)
    (tmp_path / "bad.yaml").write_text("name: x\nsteps: [{method: rtn}\n")
    assert_one_error_line(
        capsys, ["compress", *model, "-r", "bad.yaml", "-o", "a"], "'bad.yaml' is not valid YAML"
    )


def test_a_model_file_of_another_kind_is_one_line(tmp_path, capsys, monkeypatch):
    _project(tmp_path, monkeypatch)
    (tmp_path / "evil.pkl").write_bytes(b"\x80\x04N.")
    argv = ["compress", "evil.pkl", "-r", "w8", "-o", "a"]
    err = assert_one_error_line(capsys, argv, "'evil.pkl' is not a MODEL form (.pkl)")
    assert "--trust-pickle" in err
    assert_one_error_line(
        capsys,
        ["compress", "w.safetensors", "-r", "w8", "-o", "a"],
        "'w.safetensors' is not a MODEL form (.safetensors)",
        "package.module:factory --weights",
    )
