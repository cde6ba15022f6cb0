"""The deploy_recipes section's table: untimed cells, CPU time, the post-training variant of
training recipes, the load average (bench/deploy_recipes.py)."""

from __future__ import annotations

import math

import pytest
import torch

from compactnn.bench import deploy_recipes as dr


def _row(recipe: str, ms: float = float("nan"), cpu: float = float("nan")) -> dr.RecipeRow:
    row = dr.RecipeRow("mnist-cnn", recipe, 98.5, 98.4, 98.4, 1.7e-05)
    row.deployed_ms, row.deployed_cpu_ms = ms, cpu
    return row


def test_untimed_rows_say_not_timed_instead_of_nan():
    lines = dr.table([_row("w4a4"), _row("w4a4-lsq")])
    text = "\n".join(lines)
    assert "nan" not in text
    assert "| 0 | not timed | not timed | none |" in lines[4]
    assert "Not timed (--quick, or `timed=False`)" in text


def test_training_recipes_are_marked_as_their_post_training_variant():
    lines = dr.table([_row("w4a4", 2.55, 4.9), _row("w4a4-lsq", 2.6, 5.0), _row("w2a8-ttq")])
    assert "| mnist-cnn | w4a4 | 98.50 |" in lines[4]
    assert "| w4a4-lsq (post-training variant) |" in lines[5]
    assert "| 2.60 | 5.00 | none |" in lines[5]
    note = next(line for line in lines if line.startswith("Training recipes"))
    assert note.startswith("Training recipes (w4a4-lsq, w2a8-ttq) run their post-training variant")
    assert dr.is_training_recipe("w5a8-inq") and not dr.is_training_recipe("w2a4-brecq")


@pytest.mark.filterwarnings("ignore")  # TimingWarning on a shared machine: numbers suffice
def test_time_models_gives_wall_and_cpu_milliseconds():
    models = {"a": torch.nn.Linear(64, 64), "b": torch.nn.Linear(64, 8)}
    ms = dr.time_models(models, torch.randn(64, 64))
    for wall, cpu in ms.values():
        assert 0 < wall < 1000 and 0 < cpu < 1000 and not math.isnan(cpu)


def test_run_states_the_load_average(monkeypatch):
    monkeypatch.setattr(dr, "measure_all", lambda timed: [_row("w4a4")])
    text = dr.run(quick=True)
    assert "Load average after the run (1, 5, 15 min): " in text
    assert f"on {__import__('os').cpu_count()} CPUs." in text
