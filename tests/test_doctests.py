"""Every docstring example of the package runs and prints what it says (`>>>` lines that
need files, downloads or long work are marked ``# doctest: +SKIP``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import compactnn

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(compactnn.__path__, "compactnn.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write a file (x.safetensors) write it here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    out = capsys.readouterr().out
    assert result.failed == 0, out
