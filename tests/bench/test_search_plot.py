"""The search bench's frontier picture is replaced atomically."""

from pathlib import Path

import pytest

from compactnn.bench.search import plot_frontier

POINTS = [
    {"kind": "searched", "label": "", "bytes": 100, "quality": 90.0},
    {"kind": "searched", "label": "", "bytes": 200, "quality": 95.0},
    {"kind": "uniform", "label": "w8a8", "bytes": 250, "quality": 96.0},
]


def test_a_crash_while_drawing_the_frontier_keeps_the_previous_picture(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    path = tmp_path / "frontier.png"
    plot_frontier(POINTS, str(path))
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")
    real = Figure.savefig

    def half_then_crash(self, fname, **kwargs):
        real(self, fname, **kwargs)
        data = Path(fname).read_bytes()
        Path(fname).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        plot_frontier([*POINTS[:2], {**POINTS[2], "quality": 50.0}], str(path))
    assert path.read_bytes() == before  # not a half-written picture
    assert [p.name for p in tmp_path.iterdir()] == ["frontier.png"]  # no temporary file left
