"""A MODEL factory or a --plugin imports from the folder the user runs in, but that folder
does not stay in front of installed packages: a `numpy.py` or `onnx.py` lying there (a
downloaded model folder) is never what compactnn imports later (security review, session 30)."""

import importlib.machinery
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from compactnn.cli import import_plugins
from compactnn.model_io import _load_factory
from compactnn.user_modules import user_folder_importable

FACTORY = "import torch.nn as nn\ndef build():\n    return nn.Linear(3, 2)\n"


def _resolves_to(name: str) -> str | None:
    spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
    return None if spec is None else spec.origin


def test_a_factory_imports_from_the_folder_which_then_goes_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "mynets_s30.py").write_text(FACTORY)
    (tmp_path / "onnx.py").write_text("raise SystemExit('hijacked')\n")
    save_file(nn.Linear(3, 2).state_dict(), str(tmp_path / "w.safetensors"))
    loaded = _load_factory("mynets_s30:build", str(tmp_path / "w.safetensors"))
    assert isinstance(loaded.model, nn.Linear)
    assert sys.path[-1] == str(tmp_path) and sys.path[0] != str(tmp_path)
    origin = _resolves_to("onnx")
    assert origin is None or Path(origin).parent != tmp_path, origin
    sys.modules.pop("mynets_s30", None)


def test_a_plugin_imports_from_the_folder_which_then_goes_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "plug_s30.py").write_text("import torch\nLOADED = torch.ones(1)\n")
    import_plugins(["plug_s30"])
    assert torch.equal(sys.modules.pop("plug_s30").LOADED, torch.ones(1))
    assert sys.path[-1] == str(tmp_path) and sys.path[0] != str(tmp_path)


def test_the_folder_is_first_only_while_the_named_module_imports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["/site", str(tmp_path), "/lib"])
    with user_folder_importable():
        assert sys.path == [str(tmp_path), "/site", str(tmp_path), "/lib"]
    assert sys.path == ["/site", str(tmp_path), "/lib"]  # already there: left where it was
