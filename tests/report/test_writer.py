"""The report writer on synthetic results: four files, JSON round trip, a real PNG."""

from __future__ import annotations

import json
import struct

from compactnn.report import summary_table, write_report
from compactnn.report.writer import fmt_quality


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
    assert "| cnn | w4a8 | 98.10% |" in md
    assert "| lm | w4-g32 | 0.9700 |" in md
    assert "10.00 ms (10.0-15.0)" in md  # min-max shown when runs spread > 10%
    assert "w4-g32: `emb` (not targeted by the recipe)" in md  # layers kept in float
    assert "uint4-asym-group32" in md and "![quality vs size](pareto.png)" in md
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
