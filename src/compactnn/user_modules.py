"""Importing a module the user named (a MODEL factory ``pkg.mod:build``, a ``--plugin``)
from the folder they run in, without leaving that folder on the import path for anything
else.

While the named module imports (and a factory runs: ``model_io``), the folder is first on
``sys.path`` (as ``python net.py`` would have it). Afterwards the folder leaves
``sys.path``: a finder at the end of ``sys.meta_path`` (:class:`SiblingFinder`) serves from
it only the top-level modules that the user's own files there import (read from their
source with :mod:`ast`, never run), so a later ``import helpers`` still works. Before session 31 the
folder stayed last on ``sys.path``: a ``colorama.py`` or ``gmpy2.py`` lying there ran
when torch or sympy tried those optional packages and found none installed (a security
review); before session 30 it stayed first, shadowing installed packages.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

MAX_SOURCES = 500  # files read to find what the user's modules import (a huge folder: the rest not)


class SiblingFinder(importlib.abc.MetaPathFinder):
    """Finds, in ``folder`` only, the top-level modules named in ``names`` (the user's own
    modules there and what they import), after every other finder: an installed package of
    the same name still wins."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.names: set[str] = set()

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if path is not None or fullname not in self.names:
            return None  # submodules come from their package's own __path__
        return importlib.machinery.PathFinder.find_spec(fullname, [self.folder])


def _finder(folder: str) -> SiblingFinder:
    for finder in sys.meta_path:
        if isinstance(finder, SiblingFinder) and finder.folder == folder:
            return finder
    finder = SiblingFinder(folder)
    sys.meta_path.append(finder)
    return finder


def imported_names(source: str) -> set[str]:
    """The top-level module names that absolute imports in ``source`` name (function bodies
    included); nothing for a file that does not parse.

    Example:
        >>> sorted(imported_names("import a.b, c\\nfrom d import e\\nfrom . import f\\n"
        ...     "def g():\\n    import h"))
        ['a', 'c', 'd', 'h']
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.partition(".")[0])
    return names


def _sources(folder: Path, name: str) -> list[Path]:
    """The ``.py`` files of top-level module ``name`` in ``folder`` (a module file, or every
    file of a package); empty when ``folder`` holds no such module."""
    if (folder / f"{name}.py").is_file():
        return [folder / f"{name}.py"]
    if (folder / name).is_dir() and name.isidentifier():
        return sorted((folder / name).rglob("*.py"))[:MAX_SOURCES]
    return []


def sibling_names(folder: Path, start: Iterable[str]) -> set[str]:
    """``start`` (top-level modules of ``folder``) and every top-level module of ``folder``
    that their sources import, transitively (read, never run)."""
    found: set[str] = set()
    todo = [n for n in start if _sources(folder, n)]
    read = 0
    while todo and read < MAX_SOURCES:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for path in _sources(folder, name):
            read += 1
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            todo.extend(n for n in imported_names(text) - found if _sources(folder, n))
    return found


def _top_level_from(folder: Path, before: set[str]) -> set[str]:
    """The top-level names of the modules imported since ``before`` from ``folder``."""
    names = set()
    for key, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if key in before or not file:
            continue
        try:
            inside = Path(file).resolve().is_relative_to(folder)
        except (OSError, ValueError):
            continue
        if inside:
            names.add(key.partition(".")[0])
    return names


@contextlib.contextmanager
def user_folder_importable() -> Iterator[None]:
    """The current folder first on ``sys.path`` while a module the user named is imported;
    then off ``sys.path``, with a :class:`SiblingFinder` serving only the user's own modules
    there (module docstring).

    Example:
        >>> with user_folder_importable():
        ...     first = sys.path[0]
        >>> first == str(Path.cwd())
        True
    """
    here = str(Path.cwd())
    before = set(sys.modules)
    sys.path.insert(0, here)
    try:
        yield
    finally:
        sys.path.remove(here)  # the first occurrence: ours; one the user put there stays
        folder = Path(here).resolve()
        mine = _top_level_from(folder, before)
        if mine:
            _finder(here).names |= sibling_names(folder, mine)


def import_hint(exc: BaseException, module_name: str) -> str:
    """The fix for a factory module that did not import because it is not on the path
    (run from another folder); ``""`` for any other import error.

    Example:
        >>> exc = ModuleNotFoundError("No module named 'tinynet'", name="tinynet")
        >>> import_hint(exc, "tinynet")[:48]
        '; run from the folder that holds tinynet.py (or '
    """
    missing = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not missing:
        return ""
    if module_name != missing and not module_name.startswith(missing + "."):
        return ""  # the factory's module imported, one of its own imports failed
    return (
        f"; run from the folder that holds {missing}.py (or its package), or add that folder "
        "to PYTHONPATH (PYTHONPATH=/path/to/folder compactnn ...)"
    )
