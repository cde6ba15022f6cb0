"""The tables and text of a report for any model, from a hand-built results record."""

from __future__ import annotations

from compactnn.report.any_model_table import HEADER, RESIDENT, _blocks, header, table_rows


def _lat(median: float, lo: float, hi: float, suspect=()) -> dict:
    return {"median_s": median, "min_s": lo, "max_s": hi, "suspect": list(suspect)}


def _results(metric: str = "top1") -> dict:
    rows = [
        {"label": "float", "runs_as": "fp32 eager", "metric": metric, "quality": 90.0,
         "size_bytes": 3 * 2**20, "size_ratio": 1.0, "latency": _lat(0.004, 0.0039, 0.0041),
         "speedup": 1.0, "notes": []},
        {"label": "w8a8", "runs_as": "simulated", "metric": metric, "quality": 88.5,
         "size_bytes": 2**19, "size_ratio": 6.0, "latency": _lat(0.005, 0.004, 0.0065),
         "speedup": None, "notes": ["a note"], "resident_bytes": 2**21,
         "resident_anon_bytes": 2**20, "float_layers": {"fc": "kept in float"}},
    ]  # fmt: skip
    return {"rows": rows, "metric": metric, "samples": 32, "latency_batch": 16,
            "environment": {"compactnn": "x", "torch": "y", "python": "3.11", "machine": "m",
                            "threads": 1, "date": "d", "runs": 5}}  # fmt: skip


def test_table_rows_follow_the_header_with_independently_formatted_cells():
    results = _results()
    rows = table_rows(results)
    assert [r[0] for r in rows] == ["float", "w8a8"] and all(len(r) == len(HEADER) for r in rows)
    cell = {name: HEADER.index(name) for name in HEADER}
    flt, sim = rows
    assert flt[cell["latency"]] == f"{0.004 * 1e3:.2f} ms"  # spread 5%: no range shown
    spread = f"{0.005 * 1e3:.2f} ms ({0.004 * 1e3:.2f}-{0.0065 * 1e3:.2f})"  # spread 50%
    assert sim[cell["latency"]] == spread
    assert flt[cell["speedup vs fastest float"]] == "1.00x"
    assert sim[cell["speedup vs fastest float"]] == "simulated"
    assert flt[cell["size on disk"]] == f"{3:.2f} MiB" and sim[cell["size on disk"]] == "512.0 KiB"
    assert sim[cell["x smaller"]] == "6.00x" and flt[cell[RESIDENT]] == "-"
    assert sim[cell[RESIDENT]] == "2.00 MiB (1.00 MiB anon.)"


def test_header_names_the_quality_column_after_an_unlabelled_metric():
    assert header(_results()) == HEADER
    named = header(_results("perplexity"))
    assert named[HEADER.index("quality")] == "perplexity (lower is better)"
    assert named[:2] == HEADER[:2] and named[3:] == HEADER[3:]


def test_blocks_hold_the_table_notes_and_float_layers():
    results = _results()
    blocks = dict(_blocks(results, b"png", "T"))
    assert blocks["h1"] == "T"
    kinds = [k for k, _ in _blocks(results, b"png", "T")]
    assert kinds.count("list") == 3  # how measured, float layers, notes
    assert blocks["table"] == (header(results), table_rows(results))
    lists = [v for k, v in _blocks(results, b"png", "T") if k == "list"]
    assert lists[1] == ["w8a8: `fc` (kept in float)"] and lists[2] == ["w8a8: a note"]
    assert "not measured" in lists[0][-1]  # no memory_s: resident memory not measured
