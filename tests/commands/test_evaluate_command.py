"""``compactnn eval`` / ``deploy`` on a practitioner's own model and data (a small CNN
factory): quality, deployment, timing, pruned artifacts and errors in the data."""

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
    return main(["eval", "art-w8a8", *MODEL, "--quick", "--no-progress", *extra])


def test_eval_with_labels_reports_top1_of_both_models(project, capsys):
    assert _eval("--data", "xy.safetensors", "--simulated", "--json", "r.json") == 0
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
    assert rows["compressed"]["runtime"] == "simulated" and rows["compressed"]["speedup"] is None
    assert "simulated (no speedup claimed)" in out


def test_eval_deploys_by_default_and_times_it_against_the_fastest_float_path(project, capsys):
    assert _eval("--data", "xy.safetensors", "--json", "r.json") == 0
    out = capsys.readouterr().out
    result = json.loads(open("r.json").read())
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"float", "deployed"}
    assert rows["deployed"]["runtime"] in ("oneDNN int8", "ONNX Runtime int8")
    # int8 kernels agree with the simulation within a step: top-1 within 2 samples of 64
    qmodel = compactnn.load("art-w8a8", model=project["factory"].make())
    simulated = evaluate(qmodel, (project["x"], project["y"]))
    assert abs(rows["deployed"]["quality"] - simulated) <= 2 * 100 / 64
    paths = result["float_paths"]
    floats = {k: v["median_s"] for k, v in paths["timings"].items() if k in paths["errors"]}
    assert rows["float"]["latency"]["median_s"] == min(floats.values())
    ratio = rows["float"]["latency"]["median_s"] / rows["deployed"]["latency"]["median_s"]
    assert rows["deployed"]["speedup"] == pytest.approx(ratio)
    assert f"fastest float path {paths['winner']}" in out and "OMP_WAIT_POLICY=" in out
    assert rows["deployed"]["latency"]["batch"] == 32


def test_eval_marks_inflated_timings_and_hedges_the_speed_verdict(project, capsys, monkeypatch):
    """Every timing judged inflated: latency and speedup cells carry " *", a footnote says
    why, and the speed note (faster or slower) says the timings look inflated."""
    from compactnn.measure import timing

    monkeypatch.setattr(timing, "suspect_reasons", lambda t: ["runs spread 90% (busy)"])
    assert _eval("--data", "xy.safetensors") == 0
    lines = capsys.readouterr().out.splitlines()
    notes = lines[lines.index("notes:") + 1 :]  # under the table, indented
    verdict = [n for n in notes if n.startswith(("  faster than", "  slower than"))]
    assert len(verdict) == 1 and "these timings look inflated" in verdict[0]
    row = next(n for n in lines if n.startswith("deployed "))
    assert row.endswith("x *") and row.count(" *") == 2  # latency and speedup
    assert any(n.startswith("* this timing looked inflated") for n in lines)


def test_eval_deploy_says_why_a_weight_only_artifact_is_not_deployable(project, capsys):
    rc = main(
        [
            "eval",
            "art-w8",
            *MODEL,
            "--quick",
            "--no-progress",
            "--data",
            "xy.safetensors",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "runs simulated: deploy found no layer" in out
    assert "CompactnnError" not in out  # the user's error, in words: no class name
    assert "deployed " not in out and "simulated (no speedup claimed)" in out


def test_eval_of_a_deployed_artifact_runs_the_deployed_model(project, capsys, monkeypatch):
    from compactnn.report import delivery

    q = compactnn.load("art-w8a8", model=project["factory"].make())
    fast = compactnn.deploy(q, "onednn", example=project["x"][:8])
    compactnn.save(fast, "dep-w8a8")  # what `compactnn deploy --save` writes

    def no_redeploy(*args, **kwargs):
        raise AssertionError("the deployed artifact was deployed again")

    monkeypatch.setattr(delivery, "deliver", no_redeploy)
    rc = main(["eval", "dep-w8a8", *MODEL, "--quick", "--no-progress", "--data", "xy.safetensors",
               "--json", "r.json"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "deployed artifact: rebuilt on onednn and verified" in out
    rows = {r["model"]: r for r in json.loads(open("r.json").read())["rows"]}
    row = rows["deployed"]
    assert row["runtime"] == "oneDNN int8" and row["recipe"] == "w8a8"
    assert row["speedup"] is not None and row["latency"]["batch"] == 32
    assert abs(row["quality"] - evaluate(q, (project["x"], project["y"]))) <= 2 * 100 / 64
    # --simulated measures the simulated model the artifact stores
    rc = main(["eval", "dep-w8a8", *MODEL, "--quick", "--no-progress", "--data", "xy.safetensors",
               "--simulated", "--json", "s.json"])  # fmt: skip
    rows = {r["model"]: r for r in json.loads(open("s.json").read())["rows"]}
    assert rc == 0 and rows["compressed"]["runtime"] == "simulated"
    assert rows["compressed"]["recipe"] == "w8a8"


@pytest.mark.parametrize("option", [["--threads", "0"], ["--runs", "-3"], ["--runs", "x"]])
def test_numeric_options_are_checked_before_any_work(option, project, capsys, monkeypatch):
    from compactnn.commands import evaluate as command

    monkeypatch.setattr(command, "evaluate", lambda args: pytest.fail("the work started"))
    with pytest.raises(SystemExit) as stop:
        _eval("--data", "xy.safetensors", *option)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert f"argument {option[0]}: {option[1]!r} is not a whole number of 1 or more" in err


@pytest.mark.parametrize(
    "labels, said",
    [
        (torch.full((64,), 42), "labels range over [42, 42] but the model has 3 outputs"),
        (torch.zeros(64), "labels must be a 1-D integer tensor of class indices"),
    ],
)
def test_bad_labels_are_reported_before_any_deployment_or_timing(
    labels, said, project, capsys, monkeypatch
):
    from compactnn.commands import evaluate as command
    from compactnn.report import delivery

    def slow(*args, **kwargs):
        pytest.fail("deployment or timing started before the labels were checked")

    monkeypatch.setattr(compactnn, "load", slow)  # rebuilds a deployed artifact
    for name in ("deliver", "deliver_float"):
        monkeypatch.setattr(delivery, name, slow)
    monkeypatch.setattr(command, "fastest_float_path", slow)
    save_file({"x": project["x"], "y": labels}, "badlabels.safetensors")
    assert _eval("--data", "badlabels.safetensors") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data badlabels.safetensors: ") and said in err
    assert len(err.splitlines()) == 1


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
    assert main([*args, "--quick", "--no-progress"]) == 0
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
    args = ["deploy", "art-w8a8", *MODEL, "--runs", "2", "--no-progress", "--quick"]
    assert main([*args, "--data", "xy.safetensors"]) == 0
    out = capsys.readouterr().out
    assert "median of at least 3 runs (a fast model: blocks of about 0.1 s), batch 32" in out
    qmodel = compactnn.load("art-w8a8", model=project["factory"].make())
    simulated = evaluate(qmodel, (project["x"], project["y"]))
    assert f"top-1 on --data: simulated {simulated:.2f}%" in out


def test_output_paths_are_checked_before_the_work(project, capsys, tmp_path):
    (tmp_path / "adir").mkdir()
    assert _eval("--json", "adir") == 2  # a folder: one error line, before any evaluation
    err = capsys.readouterr().err
    assert err.startswith("error: --json 'adir' is a folder") and "Traceback" not in err
    assert _eval("--data", "xy.safetensors", "--simulated", "--json", "new/r.json") == 0
    assert json.loads((tmp_path / "new" / "r.json").read_text())["rows"]
    deploy = ["deploy", "art-w8a8", *MODEL, "--runs", "2", "--no-progress", "--save", "dep"]
    assert main([*deploy, "--onnx", "adir"]) == 2
    assert "--onnx 'adir' is a folder" in capsys.readouterr().err
    assert not (tmp_path / "dep").exists()  # nothing saved before the refusal


@pytest.fixture
def pruned_artifact(project):
    """``art-ch50``: the factory's model channel-pruned (a plain, smaller float model)."""
    with pytest.warns(UserWarning, match="channel pruning skipped"):  # the output layer
        pruned = compactnn.compress(
            project["model"], "ch50", calib_data=project["x"], progress=False
        )
    compactnn.save(pruned, "art-ch50")
    return pruned


def test_eval_runs_a_channel_pruned_artifact_natively(
    project, pruned_artifact, capsys, monkeypatch
):
    from compactnn.commands import evaluate as command
    from compactnn.report import delivery

    raced, timed = [], {}
    real_form, real_paths = delivery.fastest_float_form, command.fastest_float_path

    def form(model, example, **kwargs):  # the pruned model's own float paths
        raced.append(model)
        return real_form(model, example, **kwargs)

    def paths(model, example, **kwargs):  # the side-by-side timing with the float paths
        timed.update(kwargs["extra"])
        return real_paths(model, example, **kwargs)

    monkeypatch.setattr(delivery, "fastest_float_form", form)
    monkeypatch.setattr(command, "fastest_float_path", paths)
    rc = main(["eval", "art-ch50", *MODEL, "--quick", "--no-progress", "--data", "xy.safetensors",
               "--json", "r.json"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    # timed on the pruned model itself (2 of 4 channels), not on a simulation
    [model] = raced
    assert isinstance(model[0], nn.Conv2d) and model[0].out_channels == 2
    rows = {r["model"]: r for r in json.loads(open("r.json").read())["rows"]}
    row = rows["compressed"]
    assert row["runtime"] in ("PyTorch fp32", "PyTorch bf16 autocast", "ONNX Runtime fp32")
    assert set(timed) == {"compressed"} and row["speedup"] is not None
    ratio = rows["float"]["latency"]["median_s"] / row["latency"]["median_s"]
    assert row["speedup"] == pytest.approx(ratio)
    assert "simulated" not in out and "qmodel has no quantized layers" not in out
    assert "runs natively: a plain float model" in out
    # 4x9+4 + 256x3+3 = 811 parameters -> 2x9+2 + 128x3+3 = 407: 50% fewer
    assert "bits/weight stored: 32 (float, no quantized layer; ch50 removed 50% of the " in out
    assert "parameters: 811 -> 407)" in out


def test_deploy_says_a_channel_pruned_artifact_has_nothing_to_deploy(
    project, pruned_artifact, capsys
):
    rc = main(["deploy", "art-ch50", *MODEL, "--no-progress", "--data", "xy.safetensors"])
    err = capsys.readouterr().err
    assert rc == 2 and "plain float model" in err and "nothing to deploy" in err
    assert "compactnn eval" in err and "torch.onnx.export" in err
    with pytest.raises(compactnn.CompactnnError, match="plain float model"):
        compactnn.deploy(pruned_artifact, example=project["x"][:4])


def test_eval_recipe_with_misfit_data_names_the_dtype_and_shape_to_pass(project, capsys):
    """A .pt2 model keeps its example input: the message spells out that shape (any N rows)
    and dtype; a model without one (a factory) names its parameters' dtype and channels."""
    example = project["x"][:2]  # (2, 1, 8, 8) float32
    batch = torch.export.Dim("batch")
    program = torch.export.export(project["model"], (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, "m.pt2")  # its shape guards raise AssertionError
    dims = ", ".join(map(str, example.shape[1:]))
    want = f"float32 values of shape (N, {dims}), like its example input (2, {dims})"
    np.save("wrongshape.npy", np.zeros((4, 3, 5, 5), dtype=np.float32))
    np.save("ints.npy", np.zeros((4, *example.shape[1:]), dtype=np.int64))  # right shape

    def error(*model, data):
        args = ["eval", *model, "--recipe", "w8a8", "--data", data, "--quick", "--no-progress"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: --data does not fit")
        return err

    err = error("m.pt2", data="wrongshape.npy")
    assert "holds float32 values of shape (4, 3, 5, 5)" in err
    assert err.endswith(f"Pass {want}.")
    err = error("m.pt2", data="ints.npy")
    assert "holds int64 values of shape (4, 1, 8, 8)" in err
    assert err.endswith(f"Pass {want} (integers are not cast: save floating-point values).")
    err = error(*MODEL[1:2], *MODEL[2:], data="wrongshape.npy")
    assert "Pass float32 values of shape (N, C, H, W) with C=1 (first layer '0')." in err


class _Misrounded(nn.Module):
    """A stand-in deployed model: the simulated one, with the logits of the samples whose
    first pixel exceeds 1 rolled by one class (a deployment that rounds some differently)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return torch.where(x[:, :1, 0, :1].reshape(-1, 1) > 1, out.roll(1, dims=1), out)


def test_eval_says_when_the_deployed_quality_differs_from_the_simulated_one(
    project, capsys, monkeypatch
):
    """compress and train report the simulated model; eval scores the deployed one. When
    they differ on the labelled data, one note gives both, and --json keeps the simulated
    model's (`simulated_quality`); when they agree nothing is said."""
    from compactnn.report import delivery

    data = (project["x"], project["y"])
    qmodel = compactnn.load("art-w8a8", model=project["factory"].make())
    simulated = evaluate(qmodel, data)
    deployed = evaluate(_Misrounded(qmodel), data)
    assert deployed != simulated  # the stand-in really scores differently

    def misrounded(kind, model, example):
        return _Misrounded(model), "ONNX Runtime int8", []

    with monkeypatch.context() as patch:
        patch.setattr(delivery, "deliver", misrounded)
        assert _eval("--data", "xy.safetensors", "--json", "r.json") == 0
    out = capsys.readouterr().out
    result = json.loads(open("r.json").read())
    assert result["rows"][1]["quality"] == pytest.approx(deployed)
    assert result["simulated_quality"] == pytest.approx(simulated)
    said = [line for line in out.splitlines() if line.startswith("  simulated model")]
    assert said == [
        "  simulated model (the fake-quantized one compress and train build): "
        f"{simulated:.2f}% top-1; deployed "
        f"(ONNX Runtime int8): {deployed:.2f}%: integer kernels round differently from the "
        "simulation (exact int32 sums, biases on the int32 grid; docs/deploy.md)"
    ]
    # the real deployment: int8 kernels, which agree with the simulation on most inputs
    assert _eval("--data", "xy.safetensors", "--json", "s.json") == 0
    out = capsys.readouterr().out
    result = json.loads(open("s.json").read())
    assert result["simulated_quality"] == pytest.approx(simulated)
    same = result["rows"][1]["quality"] == result["simulated_quality"]
    assert ("simulated model (what" in out) is not same
    assert _eval("--data", "xy.safetensors", "--simulated", "--json", "t.json") == 0
    assert json.loads(open("t.json").read())["simulated_quality"] is None  # measured already


def test_eval_labels_a_training_recipe_that_was_never_trained(project, capsys):
    """A training recipe compressed (calibrated, not trained) reads "(calibrated only, not
    trained)" in the table and the JSON; the same recipe out of training does not."""
    from compactnn.training import freeze, prepare_qat

    model, x = project["model"], project["x"]
    compactnn.save(compactnn.compress(model, "w4a4-lsq", calib_data=x, progress=False), "lsq-c")
    compactnn.save(freeze(prepare_qat(model, "w4a4-lsq", x, progress=False)), "lsq-t")
    recipes = {}
    for art in ("lsq-c", "lsq-t"):
        rc = main(["eval", art, *MODEL, "--quick", "--no-progress", "--data", "xy.safetensors",
                   "--simulated", "--json", f"{art}.json"])  # fmt: skip
        assert rc == 0
        recipes[art] = json.loads(open(f"{art}.json").read())["rows"][1]["recipe"]
    assert recipes == {"lsq-c": "w4a4-lsq (calibrated only, not trained)", "lsq-t": "w4a4-lsq"}
    assert "w4a4-lsq (calibrated only, not trained)" in capsys.readouterr().out


def test_eval_blames_what_ran_when_most_layers_stayed_simulated(project, capsys, monkeypatch):
    """A to_kernels model that runs most layers simulated in float32 on bfloat16 activations
    (TernaryBERT: 38 of 41; only the embedding tables on kernels) is not said to differ by
    integer kernels' rounding: the note names the bfloat16 compute and what ran where."""
    from compactnn.report import delivery

    qmodel = compactnn.load("art-w8a8", model=project["factory"].make())
    mixed = _Misrounded(qmodel)
    mixed._compactnn_kernels = {
        "swapped": {"emb": "EmbeddingKernel"},
        "simulated": ["fc1", "fc2"],
        "dtype": "bfloat16",
    }
    runtime = delivery.kernels_runtime(mixed._compactnn_kernels)
    monkeypatch.setattr(delivery, "deliver", lambda kind, model, example: (mixed, runtime, []))
    assert _eval("--data", "xy.safetensors") == 0
    (said,) = [s for s in capsys.readouterr().out.splitlines() if s.startswith("  simulated")]
    assert said.endswith(
        f"deployed ({runtime}): {evaluate(mixed, (project['x'], project['y'])):.2f}%: the "
        "deployed model runs in bfloat16 (activations, attention, normalization rounded to 8 "
        "significant bits), the simulated one in float32; 1 embedding table(s) gathered from "
        "their codes (the simulation's formula); 2 of 3 quantized layers simulated (float32 on "
        "bfloat16 inputs) (docs/transformers.md)"
    )
    assert "int32" not in said
