"""The note under the report table when the resident column compares runtimes, not models."""

from __future__ import annotations

import json

from compactnn.report.any_model_table import _blocks, memory_runtime, resident_note
from compactnn.report.document import to_html, to_markdown
from compactnn.report.writer import write_files

MIB = 2**20


def _row(label: str, runs_as: str, size: int, resident: int | None) -> dict:
    row = {"label": label, "runs_as": runs_as, "metric": "top1", "quality": 90.0,
           "size_bytes": size, "size_ratio": 1.0, "speedup": None, "notes": [],
           "latency": {"median_s": 1e-4, "min_s": 1e-4, "max_s": 1e-4, "suspect": []}}  # fmt: skip
    if resident is not None:
        row["resident_bytes"], row["resident_anon_bytes"] = resident, resident // 4
    return row


def _tiny_rows() -> list[dict]:
    # the tester's rep/my1: a 26 KiB model on three runtimes
    return [
        _row("float", "ONNX Runtime fp32", 26762, 33316864),
        _row("w8a8", "simulated", 10767, 16363520),
        _row("w8a8 int8", "oneDNN int8", 10767, 21315584),
        _row("ch30", "ONNX Runtime fp32", 17712, 34234368),
    ]


def _results(rows: list[dict]) -> dict:
    return {"rows": rows, "metric": "top1", "samples": 32, "latency_batch": 16,
            "environment": {"compactnn": "x", "torch": "y", "python": "3.11", "machine": "m",
                            "threads": 2, "date": "d", "runs": 10, "memory_s": 9.0}}  # fmt: skip


def test_tiny_model_on_several_runtimes_gets_the_note_naming_each_runtime():
    note = resident_note(_tiny_rows())
    assert note == (
        "Resident memory compares runtimes, not models: its 17.04 MiB spread is over 10x the "
        "largest model (26.1 KiB), and each row's figure includes its runtime's own memory: "
        "ONNX Runtime (31.77-32.65 MiB): float, ch30; PyTorch (15.61 MiB): w8a8; "
        "PyTorch + oneDNN int8 (20.33 MiB): w8a8 int8."
    )


def test_no_note_on_one_runtime_a_large_model_or_no_measurement():
    rows = _tiny_rows()
    assert resident_note([rows[0], rows[3]]) is None  # ONNX Runtime only
    large = [_row("float", "PyTorch fp32", 40 * MIB, 200 * MIB),
             _row("w8a8 int8", "oneDNN int8", 10 * MIB, 60 * MIB)]  # fmt: skip
    assert resident_note(large) is None  # spread 140 MiB, under 10 x 40 MiB: the model counts
    assert resident_note([_row(r["label"], r["runs_as"], 1000, None) for r in rows]) is None
    # a row not measured is left out, not counted as 0
    assert resident_note([rows[0], _row("w8a8", "simulated", 10767, None)]) is None


def test_runtime_of_each_runs_as():
    expected = {
        "ONNX Runtime int8": "ONNX Runtime",
        "ONNX Runtime fp32, transformer fusions": "ONNX Runtime",
        "oneDNN int8 (3 of 5 layers)": "PyTorch + oneDNN int8",
        "PyTorch bf16 autocast": "PyTorch",
        "kernels bfloat16": "PyTorch + compactnn kernels",
        "torch.compile fp32": "PyTorch + torch.compile",
        "PyTorch fp32 (probe-pruned)": "PyTorch",
    }
    assert {runs_as: memory_runtime(runs_as) for runs_as in expected} == expected


def test_note_sits_under_the_table_in_markdown_html_and_results_json(tmp_path):
    results = _results(_tiny_rows())
    blocks = _blocks(results, b"png", "T")
    kinds = [k for k, _ in blocks]
    at = kinds.index("table")
    assert blocks[at + 1] == ("p", resident_note(results["rows"]))
    write_files(tmp_path, results, blocks, b"png", "T")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["resident_note"].startswith("Resident memory compares runtimes, not models")
    md = to_markdown(blocks)
    assert md.index("| ch30 |") < md.index("Resident memory compares runtimes") < md.index("![")
    assert "<p>Resident memory compares runtimes, not models" in to_html(blocks, "T")


def test_no_note_block_and_a_null_field_when_the_column_is_comparable():
    results = _results(_tiny_rows()[:1])
    blocks = _blocks(results, b"png", "T")
    assert [k for k, _ in blocks][:5] == ["h1", "p", "h2", "table", "img"]
    assert results["resident_note"] is None
