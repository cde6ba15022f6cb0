"""Terminal tables (``commands/term_table.py``): the aligned table when it fits the terminal,
else one block of ``column: value`` lines per row; a pipe or a file never reflows."""

from __future__ import annotations

import io
import os
import random
import shutil

import pytest

from compactnn.commands.term_table import MIN_WIDTH, render, terminal_width

HEADER = ["", "recipe", "runs on", "quality", "latency", "speedup"]
ROWS = [
    ["float", "float", "ONNX Runtime fp32 for latency, PyTorch fp32 for quality", "98.50%",
     "4.76 ms (4.48-109.12) *", ""],
    ["deployed", "w4a4-mse-g32-a-very-long-recipe-name", "oneDNN int8", "98.60%",
     "3.53 ms (1.41-13.72) *", "1.35x *"],
]  # fmt: skip


def reference_table(header, rows, align):
    """The tables eval and report printed before: each column as wide as its widest cell,
    two spaces apart, ljust or rjust, trailing spaces cut (written out again, independently)."""
    table = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    out = []
    for r in table:
        cells = [
            c.rjust(w) if a == ">" else c.ljust(w) for c, w, a in zip(r, widths, align, strict=True)
        ]
        out.append("  ".join(cells).rstrip())
    return out


def parse_blocks(lines):
    """Blocks back into {title: {name: value}}: a field starts with two spaces, a wrapped
    line's continuation with four (joined with a space), blocks apart by a blank line."""
    out, title, field = {}, None, None
    for line in lines:
        if not line:
            title = field = None
        elif line.startswith("    "):
            fields = out[title]
            if field is None:  # a wrapped title
                out[title + " " + line.strip()] = out.pop(title)
                title += " " + line.strip()
            else:
                fields[field] += " " + line.strip()
        elif line.startswith("  "):
            field, _, value = line.strip().partition(":")  # a long value may start below
            out[title][field] = value
        else:
            assert title is None, f"a second title line in one block: {line!r}"
            title, field = line, None
            out[title] = {}
    return {title: {k: v.strip() for k, v in fields.items()} for title, fields in out.items()}


@pytest.mark.parametrize("width", [None, 200, 1000])
def test_a_table_that_fits_is_the_aligned_table_as_printed_before(width):
    align = "<><><<"
    assert render(HEADER, ROWS, width, align=align) == reference_table(HEADER, ROWS, align)
    assert render(HEADER, ROWS, width) == reference_table(HEADER, ROWS, "<" * 6)  # report's
    widest = max(map(len, reference_table(HEADER, ROWS, align)))
    assert render(HEADER, ROWS, widest, align=align) == reference_table(HEADER, ROWS, align)


@pytest.mark.parametrize("width", [80, 60, 40, MIN_WIDTH])
def test_a_table_too_wide_becomes_blocks_that_fit_with_every_cell(width):
    lines = render(HEADER, ROWS, width, align="<><><<")
    assert max(map(len, lines)) <= width < max(map(len, reference_table(HEADER, ROWS, "<" * 6)))
    blocks = parse_blocks(lines)
    assert list(blocks) == ["float", "deployed"]
    assert lines[0] == "float" and lines[lines.index("") + 1] == "deployed"
    assert lines.count("") == 1  # one blank line between the two blocks, none at the ends
    for row in ROWS:
        # every non-empty cell, under its column's name (words only re-spaced by the wrap)
        want = {name: cell for name, cell in zip(HEADER[1:], row[1:], strict=True) if cell}
        got = blocks[row[0]]
        if width >= 40:  # no word longer than a line: the text comes back as it was
            assert got == want
        else:  # a word longer than a line is cut: its characters all come back in order
            assert {k: v.replace(" ", "") for k, v in got.items()} == {
                k: v.replace(" ", "") for k, v in want.items()
            }
    assert "  speedup: 1.35x *" in lines and not any("speedup:" in x for x in lines[:8])


def test_blocks_fit_any_width_and_keep_every_character_of_random_cells():
    rng, reflowed = random.Random(0), 0
    words = ["a", "ms", "98.50%", "oneDNN", "int8", "(1.41-13.72)", "x" * 30, "w4a4-mse-g32"]
    for _ in range(50):
        n = rng.randint(2, 7)
        header = ["", *(f"col {i}" for i in range(1, n))]
        rows = [
            [f"row{r}", *(" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in header[1:])]
            for r in range(rng.randint(1, 4))
        ]
        width = rng.randint(MIN_WIDTH, 70)
        lines = render(header, rows, width)
        assert all(len(line) <= width for line in lines)
        if lines == reference_table(header, rows, "<" * n):
            continue  # it fits: the aligned table
        text = "".join(lines).replace(" ", "")
        for row in rows:
            for name, cell in zip(header[1:], row[1:], strict=True):
                assert f"{name}:{cell}".replace(" ", "") in text
        reflowed += 1
    assert reflowed > 25  # most of the random tables did not fit


def test_the_width_comes_from_a_terminal_or_columns_never_from_a_pipe(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((57, 24)))
    assert terminal_width(io.StringIO(), {}) is None  # a pipe, a file: never reflowed
    assert terminal_width(io.StringIO(), {"COLUMNS": "40"}) == 40
    assert terminal_width(io.StringIO(), {"COLUMNS": "wide"}) is None
    assert terminal_width(io.StringIO(), {"COLUMNS": "0"}) is None
    assert terminal_width(Tty(), {}) == 57  # the terminal's own size
    closed = io.StringIO()
    closed.close()
    assert terminal_width(closed, {}) is None


def test_eval_at_40_columns_prints_blocks_and_at_a_pipe_the_table(tmp_path, monkeypatch, capsys):
    """The command line, its measurement faked: COLUMNS=40 gives blocks no longer than 40
    columns; without COLUMNS (stdout captured: not a terminal) the aligned table, unchanged."""
    from compactnn.cli import main
    from compactnn.commands import evaluate as command
    from compactnn.commands.eval_table import TABLE_COLUMNS, table_rows
    from tests.commands.test_eval_table import _gru_sp50_result

    monkeypatch.chdir(tmp_path)
    (tmp_path / "art").mkdir()
    monkeypatch.setattr(command, "evaluate", lambda args: _gru_sp50_result())
    monkeypatch.setenv("COLUMNS", "40")
    assert main(["eval", "art", "--quick", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "quality: top1"
    end = next(i for i, line in enumerate(lines) if line.startswith("* this timing"))
    table = lines[1:end]
    assert max(map(len, table)) <= 40
    blocks = parse_blocks(table)
    assert list(blocks) == ["float", "compressed"]
    assert blocks["compressed"]["recipe"] == "sp50"
    assert blocks["compressed"]["speedup"] == "150.30x *"
    assert blocks["float"]["latency"] == "19.99 ms (0.11-66.87) *"
    assert "speedup" not in blocks["float"]  # an empty cell: no line

    monkeypatch.delenv("COLUMNS")
    assert main(["eval", "art", "--quick", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [name for name, _ in TABLE_COLUMNS]
    align = [side for _, side in TABLE_COLUMNS]
    want = reference_table(header, table_rows(_gru_sp50_result()), align)
    assert lines[1 : 1 + len(want)] == want and len(want[0]) > 40
