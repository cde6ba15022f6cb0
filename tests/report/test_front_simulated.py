"""Simulated rows claim no speedup: they are left off the latency Pareto front (in
``results.json`` and in the picture, where they are drawn grey and labelled "(simulated)"),
and stay on the size front (their artifact's size is real)."""

from __future__ import annotations

import pytest

from compactnn.report import plot
from compactnn.report.scoring import front_labels, front_mask, is_simulated


def _row(label: str, runs_as: str, ppl: float, size: int, ms: float, **extra) -> dict:
    """A row of ``compactnn report`` on a causal LM (perplexity: lower is better)."""
    recipe = label.removesuffix(" kernels")
    return {"model": "LlamaForCausalLM", "label": label, "recipe": recipe, "runs_as": runs_as,
            "metric": "perplexity", "higher_is_better": False, "quality": ppl,
            "size_bytes": size, "latency": {"median_s": ms / 1e3, "suspect": []},
            **extra}  # fmt: skip


def hf_rows() -> list[dict]:
    """The rows of a real report (rep_hf), timings as on a quiet machine."""
    return [
        _row("float", "ONNX Runtime fp32", 258.256, 462_663, 1.81),
        _row("w8", "simulated", 258.245, 131_451, 5.85),
        _row("w8 kernels", "kernels bfloat16", 258.230, 131_451, 13.27, shares_size=True),
        _row("w4-g32", "simulated", 258.173, 92_803, 17.79),
        _row("w4-g32 kernels", "kernels bfloat16", 258.142, 92_803, 18.72, shares_size=True),
        _row("w4-g32-gptq", "simulated", 258.529, 93_082, 16.41),
        _row("w4-g32-gptq kernels", "kernels bfloat16", 258.544, 93_082, 19.07, shares_size=True),
    ]


def test_is_simulated_reads_either_row_kind() -> None:
    assert is_simulated({"runs_as": "simulated"}) and is_simulated({"runtime": "simulated"})
    assert not is_simulated({"runs_as": "kernels bfloat16"})
    assert not is_simulated({"runtime": "oneDNN int8"}) and not is_simulated({})


def test_simulated_rows_are_off_the_latency_front_and_on_the_size_front() -> None:
    rows = hf_rows()
    # by hand, delivered rows only: float 1.81 ms 258.256; w8 kernels 13.27 ms 258.230 (better);
    # w4-g32 kernels 18.72 ms 258.142 (better); gptq kernels is slower and worse
    assert front_labels(rows, "latency") == ["float", "w8 kernels", "w4-g32 kernels"]
    # sizes: w4-g32 (92,803 B, 258.173) beats every other artifact; kernels rows share sizes
    assert front_labels(rows, "size") == ["w4-g32"]


def test_a_simulated_row_pushes_no_delivered_row_off_the_latency_front() -> None:
    rows = [
        {"model": "m", "recipe": "float", "runtime": "ONNX Runtime fp32", "metric": "top1",
         "quality": 98.0, "size_bytes": 4000, "latency": {"median_s": 2e-3}},
        {"model": "m", "recipe": "w4a8", "runtime": "simulated", "metric": "top1",
         "quality": 99.0, "size_bytes": 1000, "latency": {"median_s": 1e-3}},
        {"model": "m", "recipe": "w8a8", "runtime": "oneDNN int8", "metric": "top1",
         "quality": 97.5, "size_bytes": 2000, "latency": {"median_s": 1.5e-3}},
    ]  # fmt: skip
    costs = [r["latency"]["median_s"] for r in rows]
    assert front_mask(rows, "latency", costs) == [True, False, True]
    assert front_mask(rows, "size", [r["size_bytes"] for r in rows]) == [False, True, False]


def _render(monkeypatch: pytest.MonkeyPatch, rows: list[dict]):
    seen = []
    real = plot._declutter

    def spy(fig, placed):
        real(fig, placed)
        seen.append((fig, placed))

    monkeypatch.setattr(plot, "_declutter", spy)
    plot.pareto_png({"rows": rows}, panels=("size", "latency"))
    ((fig, placed),) = seen
    return fig, placed


def _points(ax) -> dict[tuple[float, float], object]:
    """Each plotted point (not the front's rings) and the line that draws it."""
    return {
        (float(x), float(y)): ln
        for ln in ax.lines
        if ln.get_linestyle() == "None" and ln.get_marker() == "o"
        for x, y in zip(ln.get_xdata(), ln.get_ydata(), strict=True)
    }


def test_the_picture_draws_simulated_rows_grey_and_off_the_latency_front(monkeypatch) -> None:
    rows = hf_rows()
    fig, placed = _render(monkeypatch, rows)
    (_size_ax, size_labels), (latency_ax, latency_labels) = placed
    ms = {r["label"]: (r["latency"]["median_s"] * 1e3, r["quality"]) for r in rows}
    points = _points(latency_ax)
    delivered = points[ms["w8 kernels"]].get_color()
    for name in ("w8", "w4-g32", "w4-g32-gptq"):
        line = points[ms[name]]
        assert line.get_color() != delivered and line.get_color() == plot.SIMULATED_COLOR
    ring = next(ln for ln in latency_ax.lines if ln.get_linestyle() == "--")
    ringed = set(zip(map(float, ring.get_xdata()), map(float, ring.get_ydata()), strict=True))
    assert ringed == {ms["float"], ms["w8 kernels"], ms["w4-g32 kernels"]}
    texts = [a.get_text() for a in latency_labels]
    assert "w8 (simulated)" in texts and "w4-g32-gptq (simulated)" in texts
    assert "w8 kernels" in texts
    assert [a.get_text() for a in size_labels] == ["float", "w8", "w4-g32", "w4-g32-gptq"]
    assert "simulated" in fig.get_suptitle() and "off the" in fig.get_suptitle()


def test_a_label_that_already_says_simulated_is_not_marked_twice(monkeypatch) -> None:
    rows = [
        {"model": "m", "recipe": "float", "runtime": "ONNX Runtime fp32", "metric": "top1",
         "quality": 98.0, "size_bytes": 4000, "latency": {"median_s": 2e-3}},
        {"model": "m", "recipe": "w4a8", "label": "w4a8 (simulated)", "runtime": "simulated",
         "metric": "top1", "quality": 97.0, "size_bytes": 1000,
         "latency": {"median_s": 1e-3, "suspect": ["busy"]}},
    ]  # fmt: skip
    _fig, placed = _render(monkeypatch, rows)
    assert [a.get_text() for a in placed[1][1]] == ["float", "w4a8 (simulated) *"]
    (line,) = [ln for ln in placed[1][0].lines if 1.0 in ln.get_xdata() and ln.get_marker() == "o"]
    assert line.get_markerfacecolor() == "none"  # inflated too: hollow


def test_no_simulated_row_no_word_in_the_caption(monkeypatch) -> None:
    rows = [r for r in hf_rows() if r["runs_as"] != "simulated"]
    for r in rows:
        r.pop("shares_size", None)
    fig, _ = _render(monkeypatch, rows)
    assert "simulated" not in fig.get_suptitle()
