"""A factory module not on the path (run from another folder) names the way to reach it."""

import pytest

from compactnn.errors import CompactnnError
from compactnn.model_io import resolve_model


def test_a_factory_module_not_on_the_path_names_pythonpath(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tinynet_absent.py here
    with pytest.raises(CompactnnError, match=r"add that folder to PYTHONPATH") as err:
        resolve_model("tinynet_absent:build", weights="w.safetensors")
    assert "holds tinynet_absent.py" in str(err.value)


def test_an_import_failing_inside_the_factory_module_gets_no_path_hint(tmp_path, monkeypatch):
    (tmp_path / "brokennet.py").write_text("import module_that_does_not_exist\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CompactnnError, match="module_that_does_not_exist") as err:
        resolve_model("brokennet:build", weights="w.safetensors")
    assert "PYTHONPATH" not in str(err.value)
