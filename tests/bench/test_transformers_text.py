"""The transformers section: its temporary files go, and the form it leaves out of the
per-shape choice is named with its numbers (bench/transformers.py, transformers_text.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compactnn.bench import peers
from compactnn.measure import float_paths

MIB = 2**20


def _row(recipe, form, b64_ms, b64_x, b1_ms, b1_x, rss_mib):
    return {
        "recipe": recipe, "form": form, "kind": "ours",
        "b64": b64_ms / 1e3, "b64_xbest": b64_x, "b1": b1_ms / 1e3, "b1_xbest": b1_x,
        "rss": rss_mib * MIB,
    }  # fmt: skip


# the w4-g32-gptq rows of the committed docs/bench/transformers.md (ms, vs fastest float, MiB)
ROWS = {
    "fp32-eager": {"kind": "float", "rss": 63.1 * MIB, "b64": 0.83, "b1": 0.018},
    "w4 kernels": _row("w4-g32-gptq", "kernels", 303.29, 1.62, 11.03, 0.53, 60.7),
    "w4 ort-nbits": _row("w4-g32-gptq", "ort-nbits", 462.62, 1.06, 5.29, 1.11, 32.4),
    "w4 checked": _row("w4-g32-gptq", "ort-nbits-checked", 517.45, 0.95, 6.81, 0.86, 30.1),
    "w4 bf16": _row("w4-g32-gptq", "ort-nbits-bf16", 460.00, 1.07, 4.99, 1.18, 78.7),
}


def test_the_left_out_bf16_form_is_named_where_it_was_faster():
    from compactnn.bench.transformers_text import bf16_note, choices_table

    table = choices_table(ROWS, {"b64": "ort-fp32", "b1": "ort-fp32-fused"})
    assert "| w4-g32-gptq | kernels, 1.62x (vs ort-fp32) | ort-nbits, 1.11x" in table
    note = bf16_note(ROWS)
    assert (
        "w4-g32-gptq at batch 1: 1.18x the fastest float against the chosen ort-nbits' 1.11x"
        in note
    )
    assert "batch 64" not in note  # kernels (1.62x) beat it there
    assert "Resident memory against float's: w4-g32-gptq 1.25x (ort-nbits 0.51x)." in note


def test_no_faster_bf16_row_says_nowhere():
    from compactnn.bench.transformers_text import bf16_note

    slow = {**ROWS, "w4 bf16": _row("w4-g32-gptq", "ort-nbits-bf16", 500, 1.0, 9.0, 0.6, 78.7)}
    assert "Where it measured faster than the chosen form: nowhere." in bf16_note(slow)


class FakeSession:
    def __init__(self, path, *args, **kwargs) -> None:
        self.path = path


@pytest.fixture
def fake_floats(monkeypatch, tmp_path):
    """Float exports that write a small file instead of MiniLM's 90 MB, in ``tmp_path``."""
    import compactnn.models

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ref = SimpleNamespace(model=torch.nn.Linear(2, 2), example={"input_ids": torch.zeros(2, 3)})
    monkeypatch.setattr(compactnn.models, "load_reference", lambda *a, **k: ref)

    def export(model, example, path):
        Path(path).write_bytes(b"x" * 1000)
        return ["input_ids"]

    monkeypatch.setattr(peers, "export_onnx", export)
    monkeypatch.setattr(peers, "_compiled", lambda *a: "not compiled in this test")
    monkeypatch.setattr(peers, "OrtModule", FakeSession)
    monkeypatch.setattr(float_paths, "ort_fused_file", lambda m, p: p)
    return ref


def test_run_removes_its_temporary_folder_on_ctrl_c(fake_floats, monkeypatch, tmp_path):
    from compactnn.bench import transformers as tf

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tf, "_ours", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tf.run(quick=True)
    assert list(tmp_path.glob("compactnn-bench-tf-*")) == []


def test_floats_without_a_folder_keep_theirs_while_a_session_holds_it(fake_floats, tmp_path):
    import gc

    from compactnn.bench import transformers as tf

    rows = tf._floats(fake_floats)  # as bench/nbits_levels.py calls it
    (folder,) = tmp_path.glob("compactnn-bench-tf-*")
    assert Path(rows["ort-fp32"]["model"].path).is_file()
    del rows
    gc.collect()
    assert not folder.exists()
