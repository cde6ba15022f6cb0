"""``compactnn search --max-drop`` on a split file: a test split that selects the recipe is
said to (search.json and the summary), and an x_val/y_val split selects instead (T1)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.recipe import Recipe

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "valnet.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import valnet

    model = valnet.make().eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    return tmp_path, model


def _labelled(model, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    with torch.no_grad():  # labels the float model gets partly wrong: a baseline below 100
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 3
    return x, y


def top1(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def _search(capsys, tmp, data: dict, out: str):
    save_file(data, tmp / "split.safetensors")
    argv = ["search", "valnet:make", "--weights", tmp / "w.safetensors", "--data",
            tmp / "split.safetensors", "-f", "w2a8,w8a8", "--max-drop", "5", "--max-evals", "3",
            "-o", tmp / out, "--no-progress"]  # fmt: skip
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, json.loads((tmp / out / "search.json").read_text())["budget"]


def test_a_test_split_that_selects_the_recipe_is_not_called_held_out(project, capsys):
    tmp, model = project
    (x_train, y_train), (x_test, y_test) = _labelled(model, 40, 1), _labelled(model, 30, 2)
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    out, budget = _search(capsys, tmp, data, "s")
    assert budget["in_sample"] is False and "(held out;" not in budget["measured_on"]
    assert "not held out from the search: it selects the recipe" in budget["measured_on"]
    note = budget["selected_on_test"]
    assert note.startswith(
        "selected on x_test/y_test: a held-out score of the chosen recipe needs data the search "
        "did not see"
    )
    assert "add x_val/y_val to --data" in note and f"note: {note}" in out
    assert budget["baseline"] == pytest.approx(top1(model, x_test, y_test))  # default: test


def test_a_validation_split_selects_and_the_test_split_stays_unseen(project, capsys):
    tmp, model = project
    (x_train, y_train), (x_val, y_val) = _labelled(model, 40, 1), _labelled(model, 30, 3)
    x_test = torch.full((20, 1, 8, 8), float("nan"))  # any read of it would show as nan
    y_test = torch.zeros(20, dtype=torch.long)
    data = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}
    out, budget = _search(capsys, tmp, data | {"x_test": x_test, "y_test": y_test}, "v")
    assert "selected_on_test" not in budget and "note: selected on" not in out
    assert "top-1 (%) on x_val/y_val of --data" in budget["measured_on"]
    assert "x_train calibrates; the search never reads x_test/y_test" in budget["measured_on"]
    assert budget["baseline"] == pytest.approx(top1(model, x_val, y_val))
    recipe = Recipe.from_yaml((tmp / "v" / "recipe.yaml").read_text())
    q = compactnn.compress(model, recipe, calib_data=x_train, progress=False)
    assert budget["quality"] == pytest.approx(top1(q, x_val, y_val))
