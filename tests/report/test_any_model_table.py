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
    assert kinds.count("list") == 4  # pareto.png in words, how measured, float layers, notes
    assert blocks["table"][:2] == (header(results), table_rows(results))
    lists = [v for k, v in _blocks(results, b"png", "T") if k == "list"]
    assert lists[2] == ["w8a8: `fc` (kept in float)"] and lists[3] == ["w8a8: a note"]
    assert "not measured" in lists[1][-1]  # no memory_s: resident memory not measured


def test_html_cells_read_ranges_with_to_and_empty_cells_in_words():
    from compactnn.report.document import to_html, to_markdown

    results = _results()
    page = to_html(_blocks(results, b"png", "T"), "T")
    low, high, median = (f"{v * 1e3:.2f}" for v in (0.004, 0.0065, 0.005))
    assert f"<td>{median} ms ({low} to {high})</td>" in page  # not "4.00-6.50": "minus"
    assert f"({low}-{high})" in to_markdown(_blocks(results, b"png", "T"))  # as before
    # the float row has no resident figure and no compressed format: words, not a bare "-"
    assert "<td>-</td>" not in page
    assert "<td>not measured</td>" in page and "<td>not compressed</td>" in page
    assert '<th scope="row">float</th>' in page and "<caption>" in page


def test_formats_give_their_unit():
    from compactnn.report.any_model_table import formats_summary

    layers = {"0": "int8-sym-channel", "3": "uint4-asym-channel", "9": "int8-sym-channel"}
    assert formats_summary(layers) == "int8 (2 layers), uint4 (1 layer)"


def test_a_delivered_row_carries_the_theoretical_size_its_table_cell_shows():
    from compactnn.report.any_model_table import artifact_row

    results = _results()
    results["rows"][1] |= {"artifact": "a/w8a8", "theoretical_bytes": 400_000}
    shared = dict(results["rows"][1], label="w8a8 int8", runs_as="oneDNN int8",
                  shares_size=True, speedup=2.0, resident_bytes=None)  # fmt: skip
    del shared["theoretical_bytes"]
    results["rows"].append(shared)
    _blocks(results, b"png", "T")  # fills results.json's record before it is written
    assert results["rows"][2]["theoretical_bytes"] == 400_000
    assert artifact_row(results["rows"], results["rows"][2]) is results["rows"][1]
    cell = table_rows(results)[2][HEADER.index("theoretical size")]
    assert cell == f"{400_000 / 2**10:.1f} KiB"


def test_the_resident_note_says_its_ranges_with_to_in_html():
    from compactnn.report.any_model_table import resident_note
    from compactnn.report.document import to_html, to_markdown

    rows = [{"label": "float", "runs_as": "ONNX Runtime fp32", "size_bytes": 26762,
             "resident_bytes": 33 * 2**20},
            {"label": "w8a8", "runs_as": "simulated", "size_bytes": 10767,
             "resident_bytes": 15 * 2**20},
            {"label": "w4a8", "runs_as": "simulated", "size_bytes": 9000,
             "resident_bytes": 16 * 2**20}]  # fmt: skip
    note = resident_note(rows)
    assert "PyTorch (15.00-16.00 MiB): w8a8, w4a8" in to_markdown([("p", note)])
    assert "PyTorch (15.00 to 16.00 MiB): w8a8, w4a8" in to_html([("p", note)], "t")
