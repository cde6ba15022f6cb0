"""Where an output path stands to the inputs of the same command: refused when writing it
would replace or change an input (``--out``, ``--json``, ``--save`` against ``--weights``,
``--data``, MODEL)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

from compactnn.errors import CompactnnError


def check_not_an_input(
    out: str | os.PathLike, option: str, inputs: dict[str, str | None], suggest: str
) -> None:
    """Refuse, ``--force`` or not, an output file whose writing would destroy an input of the
    same command: the very file an input names (``--weights``, ``--data``, a MODEL file, the
    source file of a ``module:factory`` MODEL), or a file already inside an input folder (an
    artifact, a Hugging Face directory). ``inputs`` maps how each input was named
    (``"--weights"``) to its value (None: not given); a new file, even one beside the
    inputs, is fine.

    Example:
        >>> check_not_an_input("new.json", "--json", {"--weights": None}, "eval.json")
    """
    if not os.path.exists(out):  # False too for a path the system cannot hold (too long):
        return  # the caller's check_file_path says so
    for name, spec, path, how in input_overlaps(out, inputs):
        what = f"a file inside the {name} folder {spec!r}" if path.is_dir() else f"the {name} file"
        if how != "holds":  # an existing folder around an input is not written
            raise CompactnnError(
                f"{option} {str(out)!r} is {what}: writing there would destroy an input of "
                f"this command (--force or not). Choose another file, e.g. {option} {suggest}."
            )


def check_apart_from_inputs(
    out: str | os.PathLike, option: str, inputs: dict[str, str | None], suggest: str
) -> None:
    """Refuse, ``--force`` or not, an output path (a file or a folder, existing or new) that
    is an input of the same command, lies inside an input folder, or holds an input: writing
    it would replace or change that input. ``inputs`` as for :func:`check_not_an_input`.

    Example:
        >>> check_apart_from_inputs("new-dir", "--save", {"--data": None}, "deployed")
    """
    for name, spec, path, how in input_overlaps(out, inputs):
        what = {
            "same": f"the {name} {'folder' if path.is_dir() else 'file'} itself",
            "inside": f"inside the {name} folder {spec!r}",
            "holds": f"a folder holding the {name} input {spec!r}",
        }[how]
        raise CompactnnError(
            f"{option} {str(out)!r} is {what}: writing there would replace or change an "
            f"input of this command (--force or not). Choose a path apart from the inputs,"
            f" e.g. {option} {suggest}."
        )


def input_overlaps(out: str | os.PathLike, inputs: dict[str, str | None]) -> Iterator[tuple]:
    """``(name, spec, path, how)`` for each existing path of ``inputs`` that the output path
    ``out`` meets, in order, ``how`` as :func:`path_relation` says."""
    for name, spec in inputs.items():
        for path in _spec_paths(spec):
            if how := path_relation(out, path):
                yield name, spec, path, how


def path_relation(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How ``path`` (existing or not) stands to ``other``, symbolic links resolved: ``"same"``
    (a hard link too), ``"inside"`` (under ``other``, not a file; or a link to a file in
    folder ``other``), ``"holds"`` (``other`` lies under it), else None.

    Example:
        >>> path_relation("a/b", "a"), path_relation("a/../b", "b"), path_relation("a", "a/b")
        ('inside', 'same', 'holds')
    """
    real, other_real = Path(path).resolve(), Path(other).resolve()
    exists = os.path.exists(path)
    if real == other_real or (exists and os.path.exists(other) and os.path.samefile(path, other)):
        return "same"
    if real.is_relative_to(other_real) and not os.path.isfile(other):
        return "inside"
    links = (Path(d, f) for d, _, files in os.walk(other) for f in files) if exists else ()
    if os.path.isfile(path) and any(f.exists() and f.samefile(path) for f in links):
        return "inside"
    return "holds" if other_real.is_relative_to(real) else None


def _spec_paths(spec: str | None) -> list[Path]:
    """The existing paths an input spec may name: itself, the file of ``file:attr``, or the
    source file of a ``package.module:factory`` (found without importing it)."""
    if not spec:
        return []
    candidates = [Path(spec)]
    if ":" in spec[2:]:  # not a Windows drive letter
        head = spec.rsplit(":", 1)[0]
        candidates.append(Path(head))
        candidates += _module_files(head)
    return [p for p in candidates if p.exists()]


def _module_files(name: str) -> list[Path]:
    """The source file of module ``name`` as a factory spec imports it (the current folder
    first), found without running any of its code; [] when not found."""
    from importlib.machinery import PathFinder

    if not all(part.isidentifier() for part in name.split(".")):
        return []
    search: list[str] | None = [str(Path.cwd()), *sys.path]
    spec = None
    for part in name.split("."):
        try:
            spec = PathFinder.find_spec(part, search)
        except (ImportError, ValueError, OSError):
            return []
        if spec is None:
            return []
        search = list(spec.submodule_search_locations or [])
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return []
    return [Path(spec.origin)]
