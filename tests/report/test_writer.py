"""The report writer on synthetic results: four files, JSON round trip, a real PNG."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from compactnn.report import summary_table, write_report
from compactnn.report.writer import SUMMARY_HEADER, fmt_quality

SUMMARY_HEADER_INDEX = {name: i for i, name in enumerate(SUMMARY_HEADER)}


def _timing(ms: float, spread: float = 0.0) -> dict:
    s = ms / 1e3
    return {
        "median_s": s,
        "min_s": s,
        "max_s": s * (1 + spread),
        "runs": 10,
        "warmup": 2,
        "threads": 2,
    }


def _row(model, recipe, metric, quality, size, layers, float_layers=None, spread=0.0) -> dict:
    return {
        "model": model,
        "recipe": recipe,
        "runtime": "ONNX Runtime fp32" if recipe == "float" else "oneDNN int8",
        "metric": metric,
        "quality": quality,
        "size_bytes": size,
        "theoretical_bytes": size - 100,
        "latency": _timing(10.0, spread),
        "latency_batch": 16,
        "compress_s": 1.5,
        "bit_exact_load": True,
        "layers": layers,
        "float_layers": float_layers or {},
        "notes": [],
        "artifact": f"artifacts/{model}/{recipe}",
        "size_ratio": 400_000 / size,
        "speedup": 1.0,
        "quality_delta": 0.0,
    }


def synthetic() -> dict:
    rows = [
        _row("cnn", "float", "top1", 98.5, 400_000, {"conv": "float32", "fc": "float32"}),
        _row(
            "cnn",
            "w4a8",
            "top1",
            98.1,
            60_000,
            {"conv": "int8-sym-channel", "fc": "uint4"},
            spread=0.5,
        ),
        _row("lm", "float", "cosine", 1.0, 90_000_000, {"q": "float32"}),
        _row(
            "lm",
            "w4-g32",
            "cosine",
            0.97,
            50_000_000,
            {"q": "uint4-asym-group32"},
            {"emb": "not targeted by the recipe"},
        ),
    ]
    return {
        "environment": {
            "compactnn": "0.1.0",
            "torch": "2.x",
            "python": "3.11",
            "machine": "m",
            "threads": 2,
            "quick": False,
            "date": "today",
        },
        "models": {
            "cnn": {"metric": "top1", "kind": "cnn"},
            "lm": {"metric": "cosine", "kind": "transformer"},
        },
        "rows": rows,
    }


def test_write_report_files(tmp_path):
    results = synthetic()
    paths = write_report(results, tmp_path)
    assert sorted(p.name for p in paths.values()) == [
        "pareto.png",
        "report.html",
        "report.md",
        "results.json",
    ]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    png = (tmp_path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # IHDR: two panels side by side
    assert width > height > 100


def test_report_content(tmp_path):
    write_report(synthetic(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| cnn | w4a8 | oneDNN int8 | 98.10% |" in md
    assert "| lm | w4-g32 | oneDNN int8 | 0.9700 |" in md
    assert "| cnn | float | ONNX Runtime fp32 | 98.50% |" in md  # the fastest float path
    assert "10.00 ms (10.0-15.0)" in md  # min-max shown when runs spread > 10%
    assert "w4-g32: `emb` (not targeted by the recipe)" in md  # layers kept in float
    assert "uint4-asym-group32" in md and "![Scatter plots of top-1 accuracy (%) or mean " in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and 'src="pareto.png"' not in html
    assert "<code>emb</code>" in html and "<table>" in html


def test_summary_table_and_quality_format():
    table = summary_table(synthetic())
    assert table.count("\n") == 5  # header, rule, four rows
    assert fmt_quality("top1", 98.123) == "98.12%"
    assert fmt_quality("top1", -0.4, delta=True) == "-0.40 pt"
    assert fmt_quality("cosine", 0.99876) == "0.9988"
    assert fmt_quality("cosine", None) == "n/a"


def test_simulated_rows_claim_no_speedup_and_resident_memory_shows_when_known():
    results = synthetic()
    sim, deployed = results["rows"][1], results["rows"][3]
    sim["runtime"], sim["speedup"] = "simulated", 0.4  # a ratio of a simulated model: hidden
    deployed["speedup"], deployed["resident_bytes"] = 2.5, 3 * 2**20
    lines = summary_table(results).splitlines()
    cells = {line.split(" | ")[1]: line.split(" | ") for line in lines[2:]}
    header = lines[0].split(" | ")
    speed, resident = header.index("speedup vs fastest float"), header.index("resident memory")
    assert cells["w4a8"][2] == "simulated" and cells["w4a8"][speed] == "simulated"
    assert "0.40x" not in lines[3]
    assert cells["w4-g32"][speed] == "2.50x" and cells["w4-g32"][resident] == "3.00 MiB"
    assert cells["w4a8"][resident] == "-"


def test_doubtful_latencies_and_the_float_paths_are_stated(tmp_path):
    results = synthetic()
    results["rows"][1]["latency"]["suspect"] = ["runs spread 80% around the median"]
    results["environment"] |= {"omp_wait_policy": "PASSIVE", "load_avg": 9.5}
    results["models"]["cnn"]["float_paths"] = {
        "winner": "ort-fp32",
        "timings": {"fp32-eager": _timing(12.0), "ort-fp32": _timing(10.0), "w4a8": _timing(5)},
        "errors": {"fp32-eager": 0.0, "ort-fp32": 1e-7},
        "skipped": {"torch.compile": "not tried in quick mode"},
    }
    write_report(results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Latencies that may be inflated (noisy machine)" in md
    assert "- cnn w4a8: runs spread 80% around the median" in md
    assert "OMP_WAIT_POLICY=PASSIVE, 1-minute load 9.5" in md
    # the deployed model timed in the same blocks is not listed among the float paths
    assert "cnn: ort-fp32 won (fp32-eager 12.00 ms, ort-fp32 10.00 ms); torch.compile " in md


def test_a_crash_while_writing_the_picture_keeps_the_previous_one(tmp_path, monkeypatch):
    write_report(synthetic(), tmp_path)
    before = (tmp_path / "pareto.png").read_bytes()
    results_before = (tmp_path / "results.json").read_text()
    real = Path.write_bytes

    def half_then_crash(self, data):
        real(self, bytes(data)[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_then_crash)
    results = synthetic()
    results["rows"][1]["quality"] = 50.0  # a different picture
    with pytest.raises(OSError, match="disk full"):
        write_report(results, tmp_path)
    assert (tmp_path / "pareto.png").read_bytes() == before  # not a half-written file
    # nor a new results.json beside the previous run's picture and report
    assert (tmp_path / "results.json").read_text() == results_before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pareto.png",
        "report.html",
        "report.md",
        "results.json",
    ]  # no temporary file left behind
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        write_report(results, fresh)
    assert not (fresh / "pareto.png").exists()


def test_an_error_while_rendering_writes_no_file(tmp_path, monkeypatch):
    from compactnn.report import writer

    write_report(synthetic(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    results = synthetic()
    results["rows"][1]["quality"] = 50.0

    def broken(*args, **kwargs):
        raise ValueError("bad row")

    monkeypatch.setattr(writer, "to_html", broken)
    with pytest.raises(ValueError, match="bad row"):
        write_report(results, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_float_layers_are_listed_in_model_order():
    """compactnn.json stores them with sorted keys ("0", "12", "3"): listed as text, a
    12-layer model's order read 0, 12, 3."""
    from compactnn.report.writer import _layer_blocks

    reasons = {"12": "not targeted by the recipe", "3": "pruned", "0": "pruned"}
    row = _row("cnn", "ch30", "top1", 90.0, 100, {"5": "int8-sym-channel"}, reasons)
    blocks = _layer_blocks({"models": {"cnn": {}}, "rows": [row]})
    listed = next(b[1] for b in blocks if b[0] == "list")
    assert [item.split("`")[1] for item in listed] == ["0", "3", "12"]


def test_inflated_timings_are_marked_in_the_table_footnoted_and_off_the_latency_front(tmp_path):
    from compactnn.report.scoring import front_labels
    from compactnn.report.writer import SUSPECT_FOOTNOTE, summary_rows

    results = synthetic()
    _, w4a8, lm_float, w4 = results["rows"]
    w4a8["latency"] = _timing(4.0) | {"suspect": ["CPU time 1.00 ms/call is 25% of the wall"]}
    w4a8["speedup"] = 10.0 / 4.0
    lm_float["latency"]["suspect"] = ["runs spread 80% around the median"]
    w4["speedup"] = 1.0
    rows = {(r[0], r[1]): r for r in summary_rows(results)}
    lat, speed = SUMMARY_HEADER_INDEX["latency"], SUMMARY_HEADER_INDEX["speedup vs fastest float"]
    w4a8_cells, w4_cells = rows["cnn", "w4a8"], rows["lm", "w4-g32"]
    assert w4a8_cells[lat] == "4.00 ms *" and w4a8_cells[speed] == "2.50x *"
    assert rows["cnn", "float"][lat] == "10.00 ms"  # the cnn float timing is fine: no mark
    assert rows["lm", "float"][lat] == "10.00 ms *"
    # lm: its float timing looked inflated, so the speedup over it is marked, not its latency
    assert w4_cells[lat] == "10.00 ms" and w4_cells[speed] == "1.00x *"
    write_report(results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert f"- {SUSPECT_FOOTNOTE}" in md and "rerun on a quieter machine" in SUSPECT_FOOTNOTE
    assert md.index("## How this was measured") < md.index(SUSPECT_FOOTNOTE)
    assert "4.00 ms *" in (tmp_path / "report.html").read_text()
    # the latency front leaves the inflated row out: w4a8 (faster, worse) would be on it
    cnn = [r for r in results["rows"] if r["model"] == "cnn"]
    assert front_labels(cnn, "latency") == ["float"]
    assert front_labels(cnn, "size") == ["float", "w4a8"]
    del w4a8["latency"]["suspect"]
    assert front_labels(cnn, "latency") == ["float", "w4a8"]


def test_no_footnote_without_an_inflated_timing(tmp_path):
    write_report(synthetic(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert " *" not in md and "looked inflated" not in md


def test_demo_html_is_readable_without_the_picture(tmp_path):
    from compactnn.report.front_text import front_blocks

    results = synthetic()
    results["rows"][1]["latency"]["suspect"] = ["runs spread 80% around the median"]
    results["rows"][3]["runtime"] = "simulated"
    write_report(results, tmp_path)
    page = (tmp_path / "report.html").read_text()
    md = (tmp_path / "report.md").read_text()
    assert "10.00 ms (10.0 to 15.0) *" in page and "10.00 ms (10.0-15.0) *" in md
    assert '<img alt="quality vs size and vs latency"' not in page
    assert '<img alt="Scatter plots of ' in page
    # by hand: cnn's w4a8 (60 kB, 98.1%) and float (400 kB, 98.5%) are both on the size
    # front; w4a8's timing looked inflated, so float alone is on the latency front
    for text in (md, page):
        assert "cnn, quality vs size on disk: on the Pareto front, w4a8 and float." in text
        assert (
            "cnn, quality vs median latency: on the Pareto front, float; left off it: w4a8 ("
            in (text)
        )
        assert (
            "lm, quality vs median latency: on the Pareto front, float; left off it: w4-g32 "
            in (text)
        )
    # results.json carries the fronts the sentences name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["pareto_front"]["cnn"] == {"size": ["float", "w4a8"], "latency": ["float"]}
    assert '<th scope="row">cnn</th><th scope="row">w4a8</th>' in page
    assert "<td>-</td>" not in page and "<td>not measured</td>" in page
    assert page.count("<caption>") == page.count("<table>") == 3
    assert front_blocks  # the same words as the any-model report (test_front_text.py)
