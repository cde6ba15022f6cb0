"""How ``compactnn eval`` prints its result (``commands/eval_table.py``): columns kept
apart, and the float row's two runtimes."""

import torch
from torch import nn


def test_eval_table_keeps_columns_apart_whatever_the_cell_lengths(monkeypatch, capsys):
    """Each column is as wide as its widest cell: long texts never run into the next one."""
    import argparse
    import re

    from compactnn.commands import evaluate as command

    long_latency = "12.3 ms (oneDNN, 2 threads, batch 8, with a long note)"
    rows = [
        {
            "model": "float",
            "recipe": "float",
            "runtime": "ONNX Runtime fp32 fused (transformer optimizer)",
            "metric": "top1",
            "quality": 98.5,
            "size_bytes": 397312,
            "latency_text": long_latency,
        },
        {
            "model": "deployed",
            "recipe": "w4a4-mse-g32-a-very-long-recipe-name",
            "runtime": "oneDNN int8 + popcount + more words",
            "metric": "top1",
            "quality": 98.4,
            "size_bytes": 59187,
            "latency_text": long_latency,
            "speedup": 1.35,
        },
    ]
    result = {
        "rows": rows,
        "notes": [],
        "stored_bits": {},
        "batch": 8,
        "omp_wait_policy": "PASSIVE",
        "gomp_spincount": "unset",
        "float_paths": None,
    }
    monkeypatch.setattr(command, "evaluate", lambda args: result)
    args = argparse.Namespace(json=None, quick=True, runs=3, threads=2)
    assert command.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if "runs on" in line)
    header, table = lines[start], lines[start + 1 : start + 3]
    names = ["recipe", "runs on", "quality", "size on disk", "x smaller", "latency", "speedup"]
    assert re.split(r" {2,}", header.strip()) == names
    for line, row in zip(table, rows, strict=True):
        cells = re.split(r" {2,}", line)
        assert cells[0] == row["model"] and cells[1] == row["recipe"]
        assert cells[2] == row["runtime"] and cells[6] == long_latency
    assert re.split(r" {2,}", table[1])[7] == "1.35x"
    # a left-aligned column starts where its header starts, on every row
    for name, key in (("runs on", "runtime"), ("latency", "latency_text")):
        assert table[0].index(rows[0][key]) == table[1].index(rows[1][key]) == header.index(name)
    assert table[1].index("1.35x") == header.index("speedup")


def test_the_float_row_says_which_runtime_gave_its_quality_and_which_its_latency():
    """Float quality is measured in PyTorch fp32 (eager) whatever float path is fastest."""
    import argparse
    from types import SimpleNamespace

    from compactnn.commands import eval_table
    from compactnn.commands import evaluate as command
    from compactnn.model_io import LoadedModel

    torch.manual_seed(0)
    model = nn.Linear(4, 3).eval()
    x = torch.randn(8, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 3  # 6 of 8 right: 75%
    timing = SimpleNamespace(to_dict=lambda: {"median_s": 1e-3}, fmt=lambda: "1.00 ms")
    args = argparse.Namespace(no_progress=True)

    def row(label, winner, runtime=None):
        paths = SimpleNamespace(winner=winner, best=timing, timings={label: timing})
        loaded = LoadedModel(model, "m")
        return command._row(args, loaded, (x, y), [], paths, model, label, model, 100, "r", runtime)

    ort = row("float", "ort-fp32")
    assert (ort["runtime"], ort["quality_runtime"], ort["quality"]) == (
        "ONNX Runtime fp32",
        "PyTorch fp32",
        75.0,
    )
    eager = row("float", "fp32-eager")
    deployed = row("deployed", "ort-fp32", "oneDNN int8")
    assert deployed["quality_runtime"] == "oneDNN int8"  # measured on the form it times
    cells = [r[2] for r in eval_table.table_rows({"rows": [ort, eager, deployed]})]
    assert cells == [
        "ONNX Runtime fp32 for latency, PyTorch fp32 for quality",
        "PyTorch fp32",
        "oneDNN int8",
    ]


def test_a_perplexity_column_follows_quality_only_when_scored():
    """A causal LM's rows add "perplexity" (float value, then value and times the float one);
    other results keep the columns they had."""
    import re

    from compactnn.commands import eval_table

    def row(model, ppl, ratio):
        return {
            "model": model, "recipe": model, "runtime": "PyTorch fp32", "metric": "cosine",
            "quality": 1.0, "size_bytes": 1000, "latency_text": "1.00 ms", "speedup": 2.0,
            "perplexity": ppl, "perplexity_ratio": ratio,
        }  # fmt: skip

    rows = [row("float", 131.0534, None), row("w4-g32", 132.4, 132.4 / 131.0534)]
    result = {"rows": rows, "perplexity_tokens": 80, "perplexity_data": "--data ids.npy"}
    lines = eval_table.text_table(eval_table.table_columns(result), eval_table.table_rows(result))
    header = re.split(r" {2,}", lines[0].strip())
    assert header[2:4] == ["quality", "perplexity"]
    assert re.split(r" {2,}", lines[1])[4] == "131.05"
    assert re.split(r" {2,}", lines[2])[4] == f"132.40 ({132.4 / 131.0534:.3f}x)"
    assert lines[2].index(")") + 1 == lines[0].index("perplexity") + len("perplexity")  # right
    assert "over 80 predicted tokens of --data ids.npy" in eval_table.quality_line(result)
    plain = {"rows": [row("float", None, None)]}
    assert eval_table.table_columns(plain) == eval_table.TABLE_COLUMNS
    assert len(eval_table.table_rows(plain)[0]) == len(eval_table.TABLE_COLUMNS)
    assert eval_table.quality_line(plain) == "quality: cosine"


def test_bits_line_names_each_extreme_apart_from_its_number():
    """``nn.Sequential`` layers are named by numbers ("7", "0"): each extreme reads
    ``name: bits``, the lowest and the highest of the per-layer values."""
    import re

    from compactnn.commands.eval_table import bits_line

    bits = {"total": 4.23, "3": 5.5, "7": 4.06, "0": 9.78, "features.1": 6.0}
    line = bits_line(bits)
    assert line.startswith("bits/weight stored: 4.23 over 4 compressed layers (")
    lo, hi = re.search(r"\((.*?); ", line).group(1).split(" .. ")
    layers = {k: v for k, v in bits.items() if k != "total"}
    want = [min(layers, key=layers.get), max(layers, key=layers.get)]
    assert [lo, hi] == [f"{name}: {layers[name]:.2f}" for name in want] == ["7: 4.06", "0: 9.78"]


def _gru_sp50_result() -> dict:
    """The rows of a real ``eval --quick`` run (/tmp/s25/t3 ev/gru-sp50.json): the float
    baseline (ort-fp32, 19.99 ms, runs 0.11-66.87 ms) looked inflated, the pruned row did not."""
    busy = "runs spread 334% around the median (0.11-66.87 ms): something else ran"
    base = {"median_s": 0.01999062, "min_s": 0.00010668, "max_s": 0.06687415, "suspect": [busy]}
    calm = {"median_s": 0.00013301, "min_s": 0.00010593, "max_s": 0.04480639, "suspect": []}
    common = {"runtime": "ONNX Runtime fp32", "metric": "top1", "size_bytes": 18370}
    return {
        "rows": [
            {**common, "model": "float", "recipe": "float", "quality": 85.44,
             "latency": base, "latency_text": "19.99 ms (0.11-66.87)"},
            {**common, "model": "compressed", "recipe": "sp50", "quality": 84.89,
             "latency": calm, "latency_text": "0.13 ms (0.11-44.81)",
             "speedup": 150.29639566679842},
        ],
        "notes": [], "stored_bits": {}, "batch": 32, "omp_wait_policy": "PASSIVE",
        "gomp_spincount": "20000", "float_paths": None,
    }  # fmt: skip


def test_a_speedup_over_an_inflated_float_timing_is_marked_with_a_footnote(monkeypatch, capsys):
    """As ``compactnn report`` does: a suspect latency cell, and every speedup computed from a
    suspect float baseline, carry " *", and a footnote under the table says what it means."""
    import argparse
    import re

    from compactnn.commands import evaluate as command

    monkeypatch.setattr(command, "evaluate", lambda args: _gru_sp50_result())
    assert command.run(argparse.Namespace(json=None, quick=True, runs=3, threads=2)) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if "runs on" in line)
    float_row, row = (re.split(r" {2,}", line) for line in lines[start + 1 : start + 3])
    assert float_row[6] == "19.99 ms (0.11-66.87) *"  # the inflated timing itself
    assert row[6] == "0.13 ms (0.11-44.81)"  # this one looked fine
    assert row[7] == "150.30x *"  # computed from the inflated baseline
    assert lines[start + 3].startswith("* this timing looked inflated")


def test_calm_timings_carry_no_mark_and_no_footnote(monkeypatch, capsys):
    import argparse

    from compactnn.commands import evaluate as command

    result = _gru_sp50_result()
    result["rows"][0]["latency"]["suspect"] = []
    monkeypatch.setattr(command, "evaluate", lambda args: result)
    assert command.run(argparse.Namespace(json=None, quick=True, runs=3, threads=2)) == 0
    out = capsys.readouterr().out
    assert "150.30x" in out and " *" not in out and "looked inflated" not in out


def test_a_faster_claim_from_an_inflated_timing_is_hedged_like_a_slower_one():
    """Faster than float while a timing looked inflated: the note says so, as the "slower"
    one does; a calm faster row needs no note, and a slower one keeps its own."""
    from compactnn.commands.eval_table import speed_note

    result = _gru_sp50_result()
    base, row = (r["latency"] for r in result["rows"])
    note = speed_note(base, row)
    assert note.startswith("faster than the fastest float path (0.133 ms vs 19.99 ms): ")
    assert "these timings look inflated (see the warnings)" in note
    assert speed_note({**base, "suspect": []}, row) is None
    slower = speed_note(row, base)  # a calm float row, an inflated slower row
    assert slower.startswith("slower than the fastest float path (19.99 ms vs 0.133 ms)")
    assert "look inflated" in slower


def test_notes_come_under_the_table_so_the_output_starts_with_it(monkeypatch, capsys):
    """eval printed its notes ("slower than the fastest float path ...") before the table;
    as compress does, they now come last, under a heading, each once."""
    import argparse

    from compactnn.commands import evaluate as command

    result = _gru_sp50_result()
    result["notes"] = ["slower than the fastest float path (x)", "second", "second"]
    monkeypatch.setattr(command, "evaluate", lambda args: result)
    assert command.run(argparse.Namespace(json=None, quick=True, runs=3, threads=2)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("quality: ") and "runs on" in lines[1]
    assert lines[-3:] == ["notes:", "  slower than the fastest float path (x)", "  second"]
    assert lines[-4].startswith("(latency: ")
