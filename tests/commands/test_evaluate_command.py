"""``compactnn eval`` / ``deploy`` on a practitioner's own model and data."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compactnn
from compactnn.cli import main
from compactnn.measure import evaluate

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )


def other():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 3), nn.ReLU(), nn.Linear(3, 3))
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A factory, its weights, labelled data, and w8a8 / w8 (weight-only) artifacts of it."""
    (tmp_path / "eval_cli_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import eval_cli_factory

    model = eval_cli_factory.make().eval()
    save_file(model.state_dict(), "w.safetensors")
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)  # the float model is right on every sample: top-1 100%
    y[:16] = (y[:16] + 1) % 3  # ... except the first 16: exactly 75.00%
    save_file({"x": x, "y": y}, "xy.safetensors")
    for recipe in ("w8a8", "w8"):
        q = compactnn.compress(model, recipe, calib_data=x, progress=False)
        compactnn.save(q, f"art-{recipe}")
    return {"model": model, "x": x, "y": y, "factory": eval_cli_factory}


MODEL = ["--model", "eval_cli_factory:make", "--weights", "w.safetensors"]


def _eval(*extra):
    return main(["eval", "art-w8a8", *MODEL, "--runs", "2", "--no-progress", *extra])


def test_eval_with_labels_reports_top1_of_both_models(project, capsys):
    assert _eval("--data", "xy.safetensors", "--json", "r.json") == 0
    out = capsys.readouterr().out
    rows = {r["model"]: r for r in json.loads(open("r.json").read())["rows"]}
    qmodel = compactnn.load("art-w8a8", model=project["factory"].make())
    data = (project["x"], project["y"])
    assert rows["float"]["metric"] == rows["compressed"]["metric"] == "top1"
    assert rows["float"]["quality"] == pytest.approx(75.0)  # by construction of the labels
    assert rows["float"]["quality"] == pytest.approx(evaluate(project["model"], data))
    assert rows["compressed"]["quality"] == pytest.approx(evaluate(qmodel, data))
    assert "quality: top1" in out and "75.00%" in out
    assert f"{rows['compressed']['quality']:.2f}%" in out
    assert "batch 32, 2 threads" in out  # --data tensors are timed in batches of 32


def test_eval_deploy_adds_the_deployed_row(project, capsys):
    assert _eval("--data", "xy.safetensors", "--deploy", "--json", "r.json") == 0
    out = capsys.readouterr().out
    rows = {r["model"]: r for r in json.loads(open("r.json").read())["rows"]}
    assert "deployed on" in out and set(rows) == {"float", "compressed", "deployed"}
    # int8 kernels agree with the simulation within a step: top-1 within 2 samples of 64
    assert abs(rows["deployed"]["quality"] - rows["compressed"]["quality"]) <= 2 * 100 / 64


def test_eval_deploy_says_why_a_weight_only_artifact_is_not_deployable(project, capsys):
    rc = main(
        [
            "eval",
            "art-w8",
            *MODEL,
            "--runs",
            "2",
            "--no-progress",
            "--deploy",
            "--data",
            "xy.safetensors",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "not deployable" in out and "deployed " not in out


def test_wrong_shape_data_is_one_error_line(project, capsys):
    np.save("wrongshape.npy", np.zeros((4, 3, 5, 5), dtype=np.float32))
    assert _eval("--data", "wrongshape.npy") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --data does not fit")
    assert "(4, 3, 5, 5)" in err and "C=1" in err


def test_float64_npy_is_cast_for_eval_and_calibration(project, capsys):
    np.save("f64.npy", project["x"].double().numpy())  # numpy's default dtype
    assert _eval("--data", "f64.npy") == 0
    assert "output cosine vs float" in capsys.readouterr().out
    args = ["eval", *MODEL[1:2], *MODEL[2:], "--recipe", "w8a8", "--data", "f64.npy"]
    assert main([*args, "--runs", "2", "--no-progress"]) == 0
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.save("ids.npy", ints)
    from compactnn.model_io import resolve_data

    assert resolve_data("ids.npy").dtype == torch.int64  # token ids stay integer
    assert resolve_data("f64.npy").dtype == torch.float32


def test_wrong_weights_give_a_short_error(project, capsys):
    other = project["factory"].other()
    save_file(other.state_dict(), "other.safetensors")
    rc = main(["eval", "eval_cli_factory:make", "--weights", "other.safetensors"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and len(err) < 500
    assert "2 unexpected (e.g. '5.bias', '5.weight')" in err
    assert "3 with another shape" in err
    assert "'0.weight' file (6, 1, 3, 3) vs model (4, 1, 3, 3)" in err


def test_load_with_the_wrong_architecture_raises_artifact_error(project):
    with pytest.raises(compactnn.ArtifactError):
        compactnn.load("art-w8a8", model=project["factory"].other())
    with pytest.raises(compactnn.ArtifactError):
        compactnn.load("art-w8a8", model=nn.Sequential(nn.Linear(3, 3)))


def test_deploy_accepts_no_progress_and_prints_the_batch(project, capsys):
    args = ["deploy", "art-w8a8", *MODEL, "--runs", "2", "--no-progress"]
    assert main([*args, "--data", "xy.safetensors"]) == 0
    out = capsys.readouterr().out
    assert "latency: median of 2 runs, batch 32, 2 threads" in out
    qmodel = compactnn.load("art-w8a8", model=project["factory"].make())
    simulated = evaluate(qmodel, (project["x"], project["y"]))
    assert f"top-1 on --data: simulated {simulated:.2f}%" in out
