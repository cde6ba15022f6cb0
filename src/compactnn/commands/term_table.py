"""Tables printed on a terminal (``compactnn eval``'s and ``compactnn report``'s): aligned
columns when they fit the terminal's width, else one block of ``column: value`` lines per
row, which a narrow terminal and a screen reader both follow. Output to a pipe or a file
keeps the aligned table, whatever its width, so scripts read what they always read."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

MIN_WIDTH = 20  # a narrower terminal still gets lines of this many columns, not one per word
FIELD = "  "  # a block's "column: value" lines, under the row's title line
MORE = "    "  # a wrapped line's continuation, deeper than any field


def terminal_width(
    stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> int | None:
    """The columns a table must fit (:func:`shutil.get_terminal_size`) when ``stream`` (by
    default stdout) is a terminal or ``COLUMNS`` holds a positive whole number; None for a
    pipe, a file or a script (never reflowed).

    Example:
        >>> import io
        >>> terminal_width(io.StringIO(), {"COLUMNS": "80"}), terminal_width(io.StringIO(), {})
        (80, None)
    """
    stream = sys.stdout if stream is None else stream
    environ = os.environ if environ is None else environ
    columns = environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    isatty = getattr(stream, "isatty", None)
    try:
        tty = bool(isatty and isatty())
    except ValueError:  # a closed stream
        tty = False
    return shutil.get_terminal_size().columns if tty else None


def aligned(
    header: Sequence[Any], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None
) -> list[str]:
    """Lines of a plain-text table: each column as wide as its widest cell (header included),
    columns two spaces apart, left-aligned unless ``align`` gives ``">"`` (right) for it.

    Example:
        >>> aligned(["a", "n"], [["long cell", "1"]], align="<>")
        ['a          n', 'long cell  1']
    """
    table = [[str(cell) for cell in cells] for cells in [header, *rows]]
    align = align or "<" * len(table[0])
    widths = [max(map(len, cells)) for cells in zip(*table, strict=True)]
    return [
        "  ".join(
            f"{cell:{side}{width}}" for cell, side, width in zip(cells, align, widths, strict=True)
        ).rstrip()
        for cells in table
    ]


def _wrapped(text: str, width: int, indent: str) -> list[str]:
    """``text`` on lines of at most ``width`` columns, the first indented by ``indent``, the
    others by :data:`MORE` (a word longer than a line is cut)."""
    return textwrap.wrap(
        text,
        width,
        initial_indent=indent,
        subsequent_indent=MORE,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


def blocks(header: Sequence[Any], rows: Sequence[Sequence[Any]], width: int) -> list[str]:
    """Each row as a block: its first cell as a title line, then ``name: value`` for each
    other non-empty cell, indented by :data:`FIELD`; a blank line between blocks. A line
    longer than ``width`` (at least :data:`MIN_WIDTH`) goes on under a deeper indent.

    Example:
        >>> blocks(["", "recipe", "speedup"], [["float", "fp32", ""], ["int8", "w8a8", "2x"]], 40)
        ['float', '  recipe: fp32', '', 'int8', '  recipe: w8a8', '  speedup: 2x']
    """
    width = max(width, MIN_WIDTH)
    names = [str(name) for name in header]
    lines: list[str] = []
    for number, cells in enumerate(rows, 1):
        title, *rest = (str(cell) for cell in cells)
        lines += [""] if lines else []
        lines += _wrapped(title or f"row {number}", width, "")
        for name, cell in zip(names[1:], rest, strict=True):
            if cell.strip():
                lines += _wrapped(f"{name}: {cell}" if name else cell, width, FIELD)
    return lines


def render(
    header: Sequence[Any],
    rows: Sequence[Sequence[Any]],
    width: int | None = None,
    *,
    align: Sequence[str] | None = None,
) -> list[str]:
    """The table's lines: :func:`aligned` when every line fits ``width`` columns (or
    ``width`` is None: a pipe or a file, :func:`terminal_width`), else :func:`blocks`.

    Example:
        >>> render(["", "recipe"], [["float", "fp32"]], 80)
        ['       recipe', 'float  fp32']
        >>> render(["", "recipe"], [["float", "fp32"]], 10)
        ['float', '  recipe: fp32']
    """
    lines = aligned(header, rows, align)
    if width is None or all(len(line) <= width for line in lines):
        return lines
    return blocks(header, rows, width)
