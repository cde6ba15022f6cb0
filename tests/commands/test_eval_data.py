"""What ``compactnn eval --recipe`` calibrates on (the training split of --data, not the
held-out one it scores), the size it reports (that of the artifact compress writes), and
``--data`` data set names (scored on their held-out split)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.measure.size import artifact_bytes

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10))
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "eval_data_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import eval_data_factory

    model = eval_data_factory.make()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    split = {"x_train": x[:64], "y_train": y[:64], "x_test": x[64:], "y_test": y[64:]}
    save_file(split, tmp_path / "split.safetensors")
    save_file({"x": x[64:], "y": y[64:]}, tmp_path / "xy.safetensors")
    return model, split


def _eval(*extra):
    base = ["eval", "eval_data_factory:make", "--weights", "w.safetensors", "--recipe", "w8a8"]
    return main([*base, "--simulated", "--quick", "--runs", "1", "--no-progress", *extra])


def _spy(monkeypatch) -> list:
    seen, compress = [], compactnn.compress

    def spy(model, recipe, calib_data=None, **kw):
        seen.append(calib_data)
        return compress(model, recipe, calib_data=calib_data, **kw)

    monkeypatch.setattr(compactnn, "compress", spy)
    return seen


def test_recipe_calibrates_on_the_training_split_and_scores_the_held_out_one(
    project, monkeypatch, capsys
):
    model, split = project
    seen = _spy(monkeypatch)
    assert _eval("--data", "split.safetensors", "--json", "e.json") == 0
    assert len(seen) == 1 and torch.equal(seen[0], split["x_train"])
    err = capsys.readouterr().err
    assert (
        "note: --data holds x_train/y_train and x_test/y_test: --recipe calibrates on x_train, "
        "scoring on x_test/y_test (the held-out split)"
    ) in err
    q = compactnn.compress(model, "w8a8", calib_data=split["x_train"], progress=False)
    with torch.no_grad():
        want = 100.0 * float((q(split["x_test"]).argmax(1) == split["y_test"]).sum()) / 32
    row = json.loads(open("e.json").read())["rows"][1]
    assert row["quality"] == pytest.approx(want)


def test_recipe_on_one_split_calibrates_on_it_and_says_so(project, monkeypatch, capsys):
    _, split = project
    seen = _spy(monkeypatch)
    assert _eval("--data", "xy.safetensors") == 0
    assert torch.equal(seen[0], split["x_test"])
    assert (
        "note: --data holds one split: --recipe calibrates on the data it scores, which can "
        "flatter the score;"
    ) in capsys.readouterr().err


def test_the_size_eval_reports_is_that_of_the_artifact_compress_writes(project):
    assert _eval("--data", "split.safetensors", "--json", "e.json") == 0
    compress = ["compress", "eval_data_factory:make", "--weights", "w.safetensors"]
    assert main([*compress, "-r", "w8a8", "--data", "split.safetensors", "--out", "art"]) == 0
    row = json.loads(open("e.json").read())["rows"][1]
    assert row["size_bytes"] == artifact_bytes("art")


@pytest.mark.parametrize("name", ["digits", "digits-resnet"])
def test_a_data_set_name_is_scored_on_its_held_out_split(project, name, capsys):
    from compactnn.commands.train import labelled_data

    model, _ = project
    digits = labelled_data("digits")
    assert _eval("--data", name, "--json", "e.json") == 0
    with torch.no_grad():
        hits = (model(digits.x_test).argmax(1) == digits.y_test).sum()
    row = json.loads(open("e.json").read())["rows"][0]
    assert row["metric"] == "top1"
    assert row["quality"] == pytest.approx(100.0 * float(hits) / len(digits.y_test))
    assert "calibrates on x_train" in capsys.readouterr().err


def test_an_unknown_data_name_lists_the_data_sets_and_reference_models(project, capsys):
    assert _eval("--data", "digitz") == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: unknown data 'digitz': pass a .safetensors or .npy file of inputs, a data set "
        "name (digits, mnist) or a reference model's name (digits-resnet, "
    )
    assert err.count("\n") == 1
