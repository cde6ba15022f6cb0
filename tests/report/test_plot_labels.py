"""The Pareto picture's labels and axes (checked on the figure's data, not its pixels): long
recipe names are shortened in the middle and do not squeeze the panels, the quality axis
stops at the metric's limit, and an inflated float timing draws a hollow star."""

from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from compactnn.report import plot

LONG = (
    "w4a8-all-layers-including-first-and-last-at-four-bits-per-channel-minmax-experiment-2026-12-06"
)


def _render(monkeypatch: pytest.MonkeyPatch, rows: list[dict], panels=("size", "latency")):
    """The figure and its (axes, labels) pairs, once the picture is saved."""
    seen = []
    real = plot._declutter

    def spy(fig, placed):
        real(fig, placed)
        seen.append((fig, placed))

    monkeypatch.setattr(plot, "_declutter", spy)
    assert plot.pareto_png({"rows": rows}, panels=panels)[:4] == b"\x89PNG"
    ((fig, placed),) = seen
    FigureCanvasAgg(fig)  # closed by pareto_png: a canvas again, to measure its text
    return fig, placed


def _row(recipe: str, quality: float, size: int, ms: float, **extra) -> dict:
    return {"model": "Sequential", "recipe": recipe, "metric": "top1", "quality": quality,
            "size_bytes": size, "latency": {"median_s": ms / 1e3}, **extra}  # fmt: skip


def _rows(name: str) -> list[dict]:
    return [
        _row("float", 98.0, 120_000, 0.05),
        _row("w4a8", 98.0, 40_000, 0.2),
        _row(name, 97.9, 30_000, 0.3),
        _row(name, 97.9, 30_000, 2.0, label=f"{name} int8", shares_size=True),
    ]


def test_short_label_cuts_the_middle_of_a_long_name() -> None:
    assert plot.short_label("w4a8-pc") == "w4a8-pc"
    assert plot.short_label("x" * 28) == "x" * 28
    cut = plot.short_label(LONG)
    assert len(cut) == 28 and cut.count("\u2026") == 1
    head, tail = cut.split("\u2026")
    assert LONG.startswith(head) and LONG.endswith(tail)
    assert abs(len(head) - len(tail)) <= 1  # both ends stay readable
    assert plot.short_label(LONG, limit=11) == "w4a8-\u202612-06"


def test_a_long_recipe_name_keeps_the_panels_their_size(monkeypatch) -> None:
    fig_short, _ = _render(monkeypatch, _rows("w4a8-mse"))
    short_boxes = [v for ax in fig_short.axes for v in ax.get_position().bounds]
    monkeypatch.undo()
    fig, placed = _render(monkeypatch, _rows(LONG))
    boxes = [v for ax in fig.axes for v in ax.get_position().bounds]
    assert boxes == pytest.approx(short_boxes, abs=0.02)
    assert all(
        ax.get_position().width > 0.3 for ax in fig.axes
    )  # each of two panels keeps ~ half the width
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    texts = [a.get_text() for _ax, labels in placed for a in labels]
    assert LONG not in " ".join(texts)
    assert max(len(t.removesuffix(" *")) for t in texts) <= plot.LABEL_CHARS
    for ax, labels in placed:
        frame = ax.get_window_extent(renderer)
        ytitle = ax.yaxis.label.get_window_extent(renderer)
        for a in labels:
            box = Text.get_window_extent(a, renderer)
            assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height, a
            assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1, a.get_text()
            assert box.x0 >= ytitle.x1, a.get_text()  # off the y-axis title


@pytest.mark.parametrize(
    ("metric", "quality", "limit"), [("top1", 98.0, 100.0), ("cosine", 0.9995, 1.0)]
)
def test_the_quality_axis_stops_at_the_metrics_limit(monkeypatch, metric, quality, limit):
    rows = [_row(r, quality, s, ms) | {"metric": metric}
            for r, s, ms in (("float", 9000, 1.0), ("w8a8", 3000, 0.5))]  # fmt: skip
    fig, _ = _render(monkeypatch, rows)
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert low < quality < high <= limit


def test_a_perfect_score_sits_on_the_limit_and_stays_visible(monkeypatch) -> None:
    rows = [_row("float", 100.0, 9000, 1.0), _row("w8a8", 99.0, 3000, 0.5)]
    fig, _ = _render(monkeypatch, rows, panels=("size",))
    (ax,) = fig.axes
    assert ax.get_ylim()[1] == 100.0
    star = [ln for ln in ax.lines if ln.get_marker() == "*"]
    assert star and not star[0].get_clip_on()  # not cut in half by the axis edge


def test_a_custom_metric_is_not_clamped(monkeypatch) -> None:
    rows = [_row(r, 100.0, s, 1.0) | {"metric": "f1"} for r, s in (("float", 9000), ("a", 300))]
    fig, _ = _render(monkeypatch, rows, panels=("size",))
    assert fig.axes[0].get_ylim()[1] > 100.0


def test_an_inflated_float_timing_draws_a_hollow_star(monkeypatch) -> None:
    busy = {"median_s": 1e-3, "suspect": ["runs spread 80% around the median"]}
    rows = [_row("float", 98.0, 9000, 1.0, latency=busy), _row("w8a8", 97.0, 3000, 0.5)]
    fig, placed = _render(monkeypatch, rows)
    size_ax, latency_ax = fig.axes
    (size_star,) = [ln for ln in size_ax.lines if ln.get_marker() == "*"]
    (latency_star,) = [ln for ln in latency_ax.lines if ln.get_marker() == "*"]
    assert size_star.get_markerfacecolor() != "none"
    assert latency_star.get_markerfacecolor() == "none"
    assert "float *" in [a.get_text() for a in placed[1][1]]


def test_an_empty_latency_front_keeps_the_panels_their_size(monkeypatch) -> None:
    """Every timing inflated: no front to draw, and the latency panel was pushed aside."""
    busy = ["runs spread 80% around the median"]
    rows = [r | {"latency": r["latency"] | {"suspect": busy}} for r in _rows("w4a8-mse")]
    fig, _ = _render(monkeypatch, rows)
    size_ax, latency_ax = (ax.get_position() for ax in fig.axes)
    assert size_ax.width > 0.3 and latency_ax.width == pytest.approx(size_ax.width, abs=0.02)
    assert latency_ax.x0 == pytest.approx(size_ax.x1 + 0.1, abs=0.08)


@pytest.mark.parametrize("name", ["w4a8 $\\foo{x$ ^_", "w4a8 $x^2$ cost"])
def test_a_recipe_name_with_dollar_signs_is_drawn_as_written(monkeypatch, name) -> None:
    """matplotlib reads '$...$' as TeX: a bad pair raised (no report), a good one changed
    the name on the picture (x squared)."""
    model = "Seq $\\bad{"  # the panels' title
    rows = [{**r, "model": model} for r in _rows(name)]
    fig, placed = _render(monkeypatch, rows)
    texts = [t for _, labels in placed for t in labels]
    assert any(t.get_text().startswith(name) for t in texts)
    assert all(not t.get_parse_math() for t in texts)
    assert all(not ax.title.get_parse_math() for ax in fig.axes if ax.get_title())
