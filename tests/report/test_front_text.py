"""The words under pareto.png: each panel's Pareto front and why the other points are off it,
and an alt text that says what the picture shows (a screen reader cannot see the picture)."""

from __future__ import annotations

from compactnn.report.any_model_table import _blocks
from compactnn.report.document import to_html, to_markdown
from compactnn.report.front_text import alt_text, front_blocks, panel_sentence

BUSY = ["runs spread 700% around the median"]


def _row(label, runs_as, quality, size, ms, suspect=(), **extra) -> dict:
    return {"label": label, "recipe": label.split()[0], "runs_as": runs_as, "metric": "top1",
            "quality": quality, "size_bytes": size, "notes": [],
            "latency": {"median_s": ms / 1e3, "min_s": ms / 1e3, "max_s": ms / 1e3,
                        "suspect": list(suspect)}} | extra  # fmt: skip


def _mnist_rows() -> list[dict]:
    """The screen-reader tester's report (/tmp/s36/t4/w/rep), its numbers rounded."""
    return [
        _row("float", "ONNX Runtime fp32", 98.5, 397_281, 1.63, BUSY),
        _row("w8a8", "simulated", 98.6, 107_242, 8.77, BUSY),
        _row("w8a8 int8", "oneDNN int8", 98.6, 107_242, 0.977, BUSY, shares_size=True),
        _row("w4a8", "simulated", 98.6, 59_693, 12.8, BUSY),
        _row("w4a8 int8", "oneDNN int8", 98.6, 59_693, 1.06, BUSY, shares_size=True),
        _row("ch50-ft", "ONNX Runtime fp32", 97.6, 107_642, 0.539),
    ]


def test_size_sentence_names_the_front_the_beaten_rows_and_the_rows_not_drawn():
    # by hand: w4a8 (59,693 B, 98.6%) is no larger and no worse than every other drawn row
    text = panel_sentence(_mnist_rows(), "size")
    assert text.startswith("quality vs size on disk: on the Pareto front, w4a8; left off it: ")
    assert "float, w8a8 and ch50-ft (w4a8 is no larger and no worse)" in text
    assert "not drawn: w8a8 int8 and w4a8 int8 (" in text and text.endswith(".")


def test_latency_sentence_says_which_points_are_hollow_or_grey_and_why():
    text = panel_sentence(_mnist_rows(), "latency")
    assert text.startswith("quality vs median latency: on the Pareto front, ch50-ft;")
    assert "float, w8a8 int8 and w4a8 int8 (drawn hollow, labelled *: timing looked " in text
    assert "w8a8 and w4a8 (drawn hollow, labelled (simulated) *: ran simulated" in text


def test_a_clean_latency_panel_names_rows_beaten_by_a_faster_one_and_simulated_rows():
    rows = [_row("float", "fp32 eager", 90.0, 4000, 2.0), _row("w8", "simulated", 91.0, 1000, 5.0),
            _row("w8 int8", "oneDNN int8", 89.0, 1000, 1.0, shares_size=True),
            _row("w4 int8", "oneDNN int8", 88.0, 500, 1.5)]  # fmt: skip
    text = panel_sentence(rows, "latency")
    # by hand: w8 int8 is fastest; float (2.0 ms, 90) beats w4 int8 (1.5 ms, 88)? no: slower
    assert text.startswith("quality vs median latency: on the Pareto front, w8 int8 and float;")
    assert "w4 int8 (w8 int8 is no slower and no worse)" in text
    assert "w8 (drawn grey, labelled (simulated): ran simulated, no speedup claimed)" in text


def test_lower_is_better_metric_turns_the_front_around():
    rows = [_row("float", "fp32 eager", 30.0, 4000, 2.0), _row("w8", "fp32 eager", 31.0, 1000, 2.0),
            _row("w4", "fp32 eager", 35.0, 2000, 2.0)]  # fmt: skip
    for r in rows:
        r["metric"] = "perplexity"
    assert panel_sentence(rows, "size") == (
        "quality vs size on disk: on the Pareto front, w8 and float; left off it: w4 (w8 is no "
        "larger and no worse)."
    )


def test_alt_text_says_what_the_picture_shows():
    alt = alt_text(_mnist_rows(), ("size", "latency"))
    assert alt.startswith("Scatter plots of top-1 accuracy (%) against size on disk and against ")
    assert "Pareto front" in alt and "below" in alt and "quality vs size and latency" != alt


def test_any_model_report_has_the_alt_text_and_the_sentences_under_the_picture():
    results = {"rows": _mnist_rows(), "metric": "top1", "samples": 1000, "latency_batch": 16,
               "environment": {"compactnn": "x", "torch": "y", "python": "3.11",
                               "machine": "m", "threads": 2, "date": "d", "runs": 10}}  # fmt: skip
    for r in results["rows"]:
        r.update(speedup=None if r["runs_as"] == "simulated" else 1.0, size_ratio=1.0)
    blocks = _blocks(results, b"png", "T")
    at = [k for k, _ in blocks].index("img")
    assert blocks[at][1][0] == alt_text(results["rows"], ("size", "latency"))
    assert blocks[at + 1 : at + 3] == front_blocks(results["rows"], ("size", "latency"))
    md, page = to_markdown(blocks), to_html(blocks, "T")
    for text in (md, page):
        assert "quality vs size on disk: on the Pareto front, w4a8;" in text


def test_demo_report_names_each_models_front():
    rows = [
        _row("float", "x", 98.0, 4000, 2.0) | {"model": "cnn", "runtime": "ONNX Runtime fp32"},
        _row("w8a8", "x", 98.0, 1000, 1.0) | {"model": "cnn", "runtime": "oneDNN int8"},
        _row("float", "x", 1.0, 9000, 5.0) | {"model": "lm", "runtime": "PyTorch eager"},
        _row("w4", "x", 0.9, 3000, 9.0) | {"model": "lm", "runtime": "simulated"},
    ]
    for r in rows:
        del r["label"], r["runs_as"]
        r["metric"] = "top1" if r["model"] == "cnn" else "cosine"
    items = dict(front_blocks(rows, ("size", "latency")))["list"]
    assert items == [
        "cnn, quality vs size on disk: on the Pareto front, w8a8; left off it: float (w8a8 is "
        "no larger and no worse).",
        "cnn, quality vs median latency: on the Pareto front, w8a8; left off it: float (w8a8 "
        "is no slower and no worse).",
        "lm, quality vs size on disk: on the Pareto front, w4 and float.",
        "lm, quality vs median latency: on the Pareto front, float; left off it: w4 (drawn "
        "grey, labelled (simulated): ran simulated, no speedup claimed).",
    ]
