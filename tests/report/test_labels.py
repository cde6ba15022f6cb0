"""Label placement on the Pareto picture: labels of near-equal points do not print on top
of one another (checked on the rendered figure's text boxes, and on the pure geometry)."""

import io

import matplotlib
import pytest
from matplotlib.text import Text

from compactnn.report import plot
from compactnn.report.labels import overlap, place


def test_place_keeps_crowded_labels_apart() -> None:
    anchors = [(100.0, 100.0)] * 4 + [(103.0, 101.0)] * 2
    sizes = [(60.0, 10.0)] * 6
    boxes = place(anchors, sizes, bounds=(0, 0, 400, 300))
    for i, a in enumerate(boxes):
        assert all(overlap(a, b) == 0 for b in boxes[:i])
        assert 0 <= a[0] and a[2] <= 400 and 0 <= a[1] and a[3] <= 300


def test_place_stays_inside_the_axes() -> None:
    (box,) = place([(395.0, 295.0)], [(60.0, 10.0)], bounds=(0, 0, 400, 300))
    assert box[2] <= 400 and box[3] <= 300


def test_place_prefers_the_upper_right() -> None:
    (box,) = place([(50.0, 50.0)], [(20.0, 8.0)], pad=4.0)
    assert box == (54.0, 54.0, 74.0, 62.0)


def _rows() -> list[dict]:
    rows = [{"recipe": "float", "quality": 97.0, "size_bytes": 400_000, "median": 1e-3}]
    for k, name in enumerate(["w8a8", "w8a8-pc", "w8a8-mse", "w8a8-percentile", "w4a8"]):
        size = 100_000 + 500 * k
        rows.append({"recipe": name, "quality": 96.9 - 0.01 * k, "size_bytes": size,
                     "median": 5e-4})  # fmt: skip
    return [
        {"model": "m", "metric": "top1", "recipe": r["recipe"], "quality": r["quality"],
         "size_bytes": r["size_bytes"], "latency": {"median_s": r["median"]}}
        for r in rows
    ]  # fmt: skip


def test_rendered_labels_do_not_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = plot._declutter

    def spy(fig, panels):
        real(fig, panels)
        renderer = fig.canvas.get_renderer()
        for _ax, labels in panels:
            seen.append([tuple(Text.get_window_extent(a, renderer).extents) for a in labels])

    monkeypatch.setattr(plot, "_declutter", spy)
    png = plot.pareto_png({"rows": _rows()}, panels=("size", "latency"))
    assert png[:4] == b"\x89PNG"
    assert len(seen) == 2 and all(len(boxes) == 6 for boxes in seen)
    for boxes in seen:
        for i, a in enumerate(boxes):
            assert all(overlap(a, b) < 1.0 for b in boxes[:i]), boxes
    assert matplotlib.get_backend().lower() == "agg"
    io.BytesIO(png)


def test_a_narrow_quality_range_has_no_offset_label(monkeypatch: pytest.MonkeyPatch) -> None:
    """Qualities 0.001 apart printed a "+7.999e1" offset above the y axis."""
    rows = _rows()
    for k, r in enumerate(rows):
        r["quality"] = 80.0 - 0.001 * k
    axes = []
    real = plot._declutter

    def spy(fig, panels):
        axes.extend(fig.axes)
        real(fig, panels)

    monkeypatch.setattr(plot, "_declutter", spy)
    plot.pareto_png({"rows": rows}, panels=("size",))
    assert axes and all(ax.yaxis.get_offset_text().get_text() == "" for ax in axes)
