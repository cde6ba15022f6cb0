"""A MODEL factory or a --plugin imports from the folder the user runs in, but that folder
does not stay on the import path: a `numpy.py` or `onnx.py` lying there (a downloaded model
folder) is never what compactnn imports later (security review, session 30), nor a
`colorama.py` / `gmpy2.py` that torch or sympy look for when they are not installed (session
31); only the user's own modules there, and what they import, stay importable."""

import importlib
import importlib.machinery
import sys
from pathlib import Path

import pytest
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


@pytest.fixture(autouse=True)
def _own_meta_path(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # finders added: undone after


def test_a_factory_imports_from_the_folder_which_then_leaves_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "mynets_s30.py").write_text(FACTORY)
    (tmp_path / "onnx.py").write_text("raise SystemExit('hijacked')\n")
    save_file(nn.Linear(3, 2).state_dict(), str(tmp_path / "w.safetensors"))
    loaded = _load_factory("mynets_s30:build", str(tmp_path / "w.safetensors"))
    assert isinstance(loaded.model, nn.Linear)
    assert str(tmp_path) not in sys.path
    origin = _resolves_to("onnx")
    assert origin is None or Path(origin).parent != tmp_path, origin
    sys.modules.pop("mynets_s30", None)


def test_a_plugin_imports_from_the_folder_which_then_leaves_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "plug_s30.py").write_text("import torch\nLOADED = torch.ones(1)\n")
    import_plugins(["plug_s30"])
    assert torch.equal(sys.modules.pop("plug_s30").LOADED, torch.ones(1))
    assert str(tmp_path) not in sys.path


def test_the_folder_is_first_only_while_the_named_module_imports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["/site", str(tmp_path), "/lib"])
    with user_folder_importable():
        assert sys.path == [str(tmp_path), "/site", str(tmp_path), "/lib"]
    assert sys.path == ["/site", str(tmp_path), "/lib"]  # already there: left where it was


def test_only_the_users_own_modules_stay_importable_from_the_folder(tmp_path, monkeypatch):
    """A factory's later sibling imports (inside build(), or a sibling's own) still work; a
    module lying there that no user file imports (an optional package torch or sympy tries,
    absent from the environment) is not found there: it ran before (T4, session 31)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    marker = tmp_path / "MARKER"
    (tmp_path / "gmpy2_s31.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "layers_s31.py").write_text("import torch.nn as nn\nLayer = nn.Linear\n")
    (tmp_path / "helpers_s31.py").write_text("import layers_s31\nmake = layers_s31.Layer\n")
    (tmp_path / "nets_s31.py").write_text(
        "def build():\n    import helpers_s31\n    return helpers_s31.make(3, 2)\n"
    )
    save_file(nn.Linear(3, 2).state_dict(), str(tmp_path / "w.safetensors"))
    loaded = _load_factory("nets_s31:build", str(tmp_path / "w.safetensors"))
    assert isinstance(loaded.model, nn.Linear)  # build() imported helpers, helpers layers
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("gmpy2_s31")
    assert not marker.exists()
    for name in ("nets_s31", "helpers_s31", "layers_s31"):
        sys.modules.pop(name, None)


def test_a_factory_may_import_a_sibling_by_a_computed_name(tmp_path, monkeypatch):
    """build() runs with the folder importable, as its module's import does: a sibling
    imported by importlib.import_module(name) is found (T5: a traceback after the folder
    left sys.path); a module that exists nowhere is one CompactnnError line."""
    from compactnn.errors import CompactnnError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "dyn_helpers_s31.py").write_text("import torch.nn as nn\nmake = nn.Linear\n")
    (tmp_path / "dyn_nets_s31.py").write_text(
        "import importlib\ndef build():\n"
        "    return importlib.import_module('dyn_' + 'helpers_s31').make(3, 2)\n"
        "def broken():\n    import no_such_module_s31\n"
    )
    save_file(nn.Linear(3, 2).state_dict(), str(tmp_path / "w.safetensors"))
    loaded = _load_factory("dyn_nets_s31:build", str(tmp_path / "w.safetensors"))
    assert isinstance(loaded.model, nn.Linear)
    with pytest.raises(CompactnnError, match="failed to import a module while building"):
        _load_factory("dyn_nets_s31:broken", str(tmp_path / "w.safetensors"))
    for name in ("dyn_nets_s31", "dyn_helpers_s31"):
        sys.modules.pop(name, None)
