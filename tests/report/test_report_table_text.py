"""The any-model report's table text: each row's formats and theoretical size, a per-layer
section, sub-millisecond latencies with 3 significant digits, and user text escaped in
Markdown (HTML escapes it already)."""

from __future__ import annotations

import re

from compactnn.measure.timing import Timing
from compactnn.report.any_model_table import _blocks, header, table_rows
from compactnn.report.document import to_html, to_markdown
from compactnn.report.writer import report_blocks, summary_table

INT8 = "int8-sym-channel / act uint8"
UINT4 = "uint4-asym-channel / act uint8"


def _lat(median: float, lo: float, hi: float) -> dict:
    return {"median_s": median, "min_s": lo, "max_s": hi, "suspect": []}


def _row(label: str, runs_as: str, latency: dict, **extra) -> dict:
    row = {"label": label, "runs_as": runs_as, "metric": "top1", "quality": 90.0,
           "size_bytes": 26147, "size_ratio": 5.95, "latency": latency, "notes": []}  # fmt: skip
    return row | extra


def _results(label: str = "w4a8") -> dict:
    # first and last layers int8 (the recipe's first_last_bits), in model order (as
    # layer_formats gives them: named_modules' order, not the names' alphabetical one)
    layers = {"features.0": INT8, "features.3": UINT4, "classifier.1": UINT4,
              "classifier.3": INT8}  # fmt: skip
    rows = [
        _row("float", "ONNX Runtime fp32", _lat(8.6258e-05, 8.5e-05, 8.7e-05), speedup=1.0,
             size_bytes=155675, size_ratio=1.0, theoretical_bytes=153912, layers={}),
        _row(label, "simulated", _lat(0.00292, 0.0029, 0.00295), speedup=None,
             recipe="w4a8", artifact="art/w4a8", layers=layers, theoretical_bytes=20332,
             float_layers={}),
        _row(f"{label} int8", "ONNX Runtime int8", _lat(1.03318e-4, 1.03e-4, 1.04e-4),
             speedup=0.8348787, recipe="w4a8", artifact="art/w4a8", shares_size=True),
    ]  # fmt: skip
    return {"rows": rows, "metric": "top1", "samples": 32, "latency_batch": 16,
            "environment": {"compactnn": "x", "torch": "y", "python": "3.11", "machine": "m",
                            "threads": 1, "date": "d", "runs": 5}}  # fmt: skip


def _cells(results: dict) -> dict[str, dict[str, str]]:
    names = header(results)
    return {row[0]: dict(zip(names, row, strict=True)) for row in table_rows(results)}


def test_each_row_shows_its_theoretical_size_and_a_short_summary_of_its_formats():
    cells = _cells(_results())
    assert cells["float"]["theoretical size"] == f"{153912 / 2**10:.1f} KiB"
    assert cells["w4a8"]["theoretical size"] == f"{20332 / 2**10:.1f} KiB"
    assert cells["w4a8"]["formats"] == "int8 (2 layers), uint4 (2 layers)"  # in model order
    # the delivered row runs the same artifact: its sizes and formats are that artifact's
    assert cells["w4a8 int8"]["theoretical size"] == cells["w4a8"]["theoretical size"]
    assert cells["w4a8 int8"]["formats"] == "int8 (2 layers), uint4 (2 layers)"
    assert cells["float"]["formats"] == "-"
    # the first columns keep their places (the tutorial page's table is read by position)
    assert header(_results())[:6] == ["recipe", "runs as", "quality", "vs float",
                                      "size on disk", "x smaller"]  # fmt: skip


def test_a_layer_formats_section_lists_every_layer_of_every_artifact_in_model_order():
    """Like the demo report's section (compactnn.report.writer._layer_blocks)."""
    blocks = _blocks(_results(), b"png", "T")
    at = blocks.index(("h2", "Layer formats"))
    kind, (head, rows, *_caption) = blocks[at + 1]
    assert kind == "table" and head == ["layer", "w4a8"]  # one column per artifact
    assert rows == [["features.0", INT8], ["features.3", UINT4], ["classifier.1", UINT4],
                    ["classifier.3", INT8]]  # fmt: skip
    md = to_markdown(blocks)
    assert "| features.0 | int8-sym-channel / act uint8 |" in md
    assert md.index("## Results") < md.index("## Layer formats")


def test_sub_millisecond_latencies_keep_three_significant_digits():
    cells = _cells(_results())
    assert cells["float"]["latency"] == "0.0863 ms"
    assert cells["w4a8 int8"]["latency"] == "0.103 ms"
    assert cells["w4a8"]["latency"] == "2.92 ms"  # a millisecond and more: two decimals
    spread = _results()
    spread["rows"][0]["latency"] = _lat(8.6258e-05, 5.7436e-05, 0.0076663)
    assert _cells(spread)["float"]["latency"] == "0.0863 ms (0.0574-7.67)"
    # the ratio a reader recomputes from the cells is the printed speedup, to its 2 decimals
    shown = [
        float(re.match(r"[\d.]+", cells[k]["latency"]).group()) for k in ("float", "w4a8 int8")
    ]
    assert abs(shown[0] / shown[1] - 0.8348787) < 0.005
    # compactnn eval's table (Timing.fmt) alike
    assert Timing(8.6258e-05, 5.7436e-05, 0.0076663, 10, 2, 2).fmt() == "0.0863 ms (0.0574-7.67)"
    assert Timing(1.03318e-4, 1.03e-4, 1.04e-4, 10, 2, 2).fmt() == "0.103 ms"
    assert Timing(0.00099996, 0.00099, 0.00101, 10, 2, 2).fmt() == "1.00 ms"


def test_user_text_is_escaped_in_markdown_as_in_html():
    evil = "<img src=x onerror=alert(1)>"
    results = _results(label=f"w4a8 {evil} & co")
    blocks = _blocks(results, b"png", "<script>alert('t')</script>")
    md = to_markdown(blocks)
    assert "<img" not in md and "<script" not in md
    assert "# &lt;script&gt;alert('t')&lt;/script&gt;" in md
    assert "| w4a8 &lt;img src=x onerror=alert(1)&gt; &amp; co |" in md
    page = to_html(blocks, "t")  # escaped once, not twice
    assert "w4a8 &lt;img src=x onerror=alert(1)&gt; &amp; co" in page and "&amp;lt;" not in page
    # Markdown's own structure still works, and code spans stay code spans
    assert to_markdown([("p", "a `b` c")]) == "a `b` c\n"
    assert to_markdown([("list", ["> quoted", "x\n# heading"])]) == "- &gt; quoted\n- x # heading\n"


def test_the_demo_report_escapes_model_and_recipe_names_too():
    row = {"model": "<b>net</b>", "recipe": "<i>w8a8</i>", "metric": "top1", "quality": 90.0,
           "quality_delta": 0.0, "size_bytes": 1000, "theoretical_bytes": 900,
           "size_ratio": 2.0, "latency": _lat(0.002, 0.002, 0.002), "speedup": 1.0,
           "compress_s": 0.1, "bit_exact_load": True, "layers": {"0": INT8},
           "float_layers": {}, "notes": ["a <note>"], "latency_batch": 4}  # fmt: skip
    results = {"rows": [row], "models": {"<b>net</b>": {"metric": "top1"}},
               "environment": {"compactnn": "x", "torch": "y", "python": "3.11",
                               "machine": "m", "threads": 1, "date": "d"}}  # fmt: skip
    md = to_markdown(report_blocks(results, b"png")) + summary_table(results)
    assert "<b>" not in md and "<i>" not in md and "<note>" not in md
    assert "| &lt;b&gt;net&lt;/b&gt; | &lt;i&gt;w8a8&lt;/i&gt; |" in md


def test_the_layer_section_has_a_column_per_artifact_and_dashes_for_missing_layers():
    results = _results()
    other = _row("w2a8", "simulated", _lat(0.003, 0.003, 0.003), speedup=None, recipe="w2a8",
                 artifact="art/w2a8", layers={"features.0": "float32",
                                              "features.3": "int2-sym-channel-codebook"},
                 theoretical_bytes=2**20, float_layers={"features.0": "kept in float"})  # fmt: skip
    results["rows"].append(other)
    blocks = _blocks(results, b"png", "T")
    _, (head, rows, *_caption) = blocks[blocks.index(("h2", "Layer formats")) + 1]
    assert head == ["layer", "w4a8", "w2a8"]
    assert rows[1] == ["features.3", UINT4, "int2-sym-channel-codebook"]
    assert rows[3] == ["classifier.3", INT8, "-"]
    cells = _cells(results)["w2a8"]
    assert cells["formats"] == "float32 (1 layer), int2-codebook (1 layer)"
    assert cells["theoretical size"] == "1.00 MiB"
