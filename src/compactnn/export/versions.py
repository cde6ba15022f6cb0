"""What a header of another format version is told: how to get an artifact this compactnn reads.

Two compactnn versions cannot be imported in one process, so an artifact of an older format
cannot be loaded with the compactnn that wrote it and saved with this one. It is re-created
instead, from what its header records: the recipe (``recipe.yaml`` beside the header, written
whenever the header names a recipe) and the float model (``extra.source``: a reference model's
name, or a factory, file or folder that only the user may name again, so those get a
placeholder). A newer format needs a newer compactnn; a ``format_version`` that is not an
integer is a damaged or edited header.

Pure functions over the parsed header (plain JSON values); nothing is opened.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from compactnn.errors import cut

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a reference model's name
_RECIPE_FILE = "recipe.yaml"


def version_problem(header: dict[str, Any], where: str, current: int) -> str | None:
    """The one-line refusal for ``header`` (read from the file ``where``) when its
    ``format_version`` is not ``current``; None when it is.

    Example:
        >>> h = {"format_version": 3, "recipe": "w4a4", "extra": {}}
        >>> version_problem(h, "a/compactnn.json", 2)[:60]
        'a/compactnn.json was written by a newer compactnn (format ve'
        >>> recreate_command({"recipe": "w4a4", "extra": {"source": {"model": "mnist-cnn"}}},
        ...                  Path("o1/cnn"), 2)[:77]
        'compactnn compress mnist-cnn --recipe o1/cnn/recipe.yaml --out o1/cnn-v2 (wit'
    """
    version = header.get("format_version")
    if type(version) is int and version == current:
        return None
    if "format_version" not in header:
        return f"{where} has no format_version: the header is damaged or was edited."
    if type(version) is not int:
        return (
            f"{where} has format_version {cut(repr(version), 40)}, which must be an integer "
            f"(this compactnn reads {current}): the header is damaged or was edited."
        )
    if version > current:
        return (
            f"{where} was written by a newer compactnn (format version {version}; this one "
            f"reads {current}): upgrade compactnn to read it."
        )
    return (
        f"{where} has format version {version}, from an older compactnn (this one reads "
        f"{current}, which added a digest over every file; an older artifact cannot be loaded "
        f"and saved again in one process): re-create it with this compactnn: "
        f"{recreate_command(header, Path(where).parent, current)}"
    )


def recreate_command(header: dict[str, Any], folder: Path, current: int) -> str:
    """The command that makes the artifact in ``folder`` again from its recipe and float
    model, with what the header does not record (data, placeholders) after it."""
    extra = header.get("extra") if isinstance(header.get("extra"), dict) else {}
    if not isinstance(header.get("recipe"), str):
        return (
            "it records no recipe, so re-run the code that compressed it (compactnn.compress "
            "or compactnn.train, then compactnn.save) with this compactnn."
        )
    model, notes = _model_argument(extra.get("source"))
    training = extra.get("training")
    recipe = shlex.quote(str(folder / _RECIPE_FILE))
    new = shlex.quote(str(folder.parent / f"{folder.name}-v{current}")) if folder.name else "DIR"
    if isinstance(training, dict):
        epochs = training.get("epochs")
        epochs = f" --epochs {epochs}" if type(epochs) is int and epochs > 0 else ""
        command = f"compactnn train {model} --recipe {recipe}{epochs} --out {new}"
        notes.append("with the --data and --seed it was trained with, if any")
    else:
        command = f"compactnn compress {model} --recipe {recipe} --out {new}"
        notes.append("with the --data and --seed it was compressed with, if any")
    return f"{command} ({'; '.join(notes)})."


def _model_argument(source: Any) -> tuple[str, list[str]]:
    """MODEL for the command line and what the user must fill in: a reference model's name
    as recorded, a placeholder for code, files and folders (never named for the user to run:
    only the user can vouch for them)."""
    source = source if isinstance(source, dict) else {}
    spec = source.get("model")
    if not isinstance(spec, str) or not spec:
        return "MODEL", ["MODEL: the float model it was made from, which it does not record"]
    recorded = cut(repr(spec), 120)
    if source.get("weights") or ":" in spec:
        note = f"MODULE:FUNCTION and FILE: the factory and weights it was made from ({recorded})"
        return "MODULE:FUNCTION --weights FILE.safetensors", [note]
    if _NAME.fullmatch(spec) and not Path(spec).suffix:
        return spec, []  # a reference model: rebuilt by name
    return "MODEL", [f"MODEL: the file or folder it was made from ({recorded})"]
