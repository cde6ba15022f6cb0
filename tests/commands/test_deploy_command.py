"""``compactnn deploy``: options and output paths refused before any work, and which split of
a labelled file it verifies, times and scores on."""

import argparse
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.commands import _common
from compactnn.commands import deploy as deploy_command
from compactnn.deployment import DeployedModel
from compactnn.errors import CompactnnError
from compactnn.measure import evaluate

# deploy of the project's factory model, quick: no torch.compile, 2 timed runs
FACTORY_DEPLOY = ["deploy", "deploy_cli_factory:make", "--weights", "w.safetensors"]
FACTORY_DEPLOY += ["--runs", "2", "--quick"]

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
"""

MODEL = ["--model", "deploy_cli_factory:make", "--weights", "w.safetensors"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A factory, its weights, a w8a8 artifact, and a file with a training and a held-out
    split whose labels the float model gets all right (train) and 75% right (test)."""
    (tmp_path / "deploy_cli_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import deploy_cli_factory

    model = deploy_cli_factory.make().eval()
    save_file(model.state_dict(), "w.safetensors")
    gen = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(48, 1, 8, 8, generator=gen), torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        y_train, y_test = model(x_train).argmax(1), model(x_test).argmax(1)
    y_test[:16] = (y_test[:16] + 1) % 3
    split = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    save_file(split, "split.safetensors")
    q = compactnn.compress(model, "w8a8", calib_data=x_train, progress=False)
    compactnn.save(q, "art")
    return {"factory": deploy_cli_factory, **split}


def _deploy(*extra: str) -> int:
    return main(["deploy", "art", *MODEL, "--runs", "2", "--quick", "--no-progress", *extra])


def _no_work(monkeypatch):
    """Fail the test if the command gets as far as loading the models."""

    def refuse(args):
        raise AssertionError("the slow work started before the refusal")

    monkeypatch.setattr(deploy_command, "_models", refuse)


@pytest.mark.parametrize(
    ("onnx", "save", "words"),
    [
        ("same", "same", "is the same path as --save 'same'"),
        ("dep/m.onnx", "dep", "overlaps --save 'dep'"),
        ("m.onnx", "m.onnx/dep", "overlaps --save 'm.onnx/dep'"),
        ("./same", "same", "is the same path as --save 'same'"),
    ],
)
def test_onnx_and_save_on_one_path_are_refused_before_any_work(
    project, monkeypatch, capsys, onnx, save, words
):
    _no_work(monkeypatch)
    assert _deploy("--data", "split.safetensors", "--onnx", onnx, "--save", save) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --onnx {onnx!r} {words}") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not Path(onnx).exists() and not Path(save).exists()  # nothing written


@pytest.mark.parametrize(
    ("option", "path", "words"),
    [
        ("--onnx", "split.safetensors", "is the --data file"),
        ("--onnx", "w.safetensors", "is the --weights file"),
        ("--onnx", "art/model.safetensors", "is a file inside the MODEL_OR_ARTIFACT folder"),
        ("--onnx", "deploy_cli_factory.py", "is the --model file"),
        ("--save", "art", "is the MODEL_OR_ARTIFACT folder itself"),
        ("--save", "./art/", "is the MODEL_OR_ARTIFACT folder itself"),
        ("--save", "art/deployed", "is inside the MODEL_OR_ARTIFACT folder"),
        ("--save", ".", "is a folder holding the MODEL_OR_ARTIFACT input"),
    ],
)
def test_outputs_that_would_destroy_an_input_are_refused_even_with_force(
    project, monkeypatch, capsys, option, path, words
):
    _no_work(monkeypatch)
    before = {p: p.read_bytes() for p in Path(".").rglob("*") if p.is_file()}
    assert _deploy("--data", "split.safetensors", option, path, "--force") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} {path!r} {words}"), err
    assert "would replace or change an input" in err or "would destroy an input" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {p: p.read_bytes() for p in Path(".").rglob("*") if p.is_file()} == before


def test_outputs_beside_the_inputs_pass_the_input_check(project):
    args = argparse.Namespace(
        target="art", model="deploy_cli_factory:make", weights="w.safetensors",
        data="split.safetensors", save="deployed", onnx="m.onnx", force=False,
    )  # fmt: skip
    deploy_command.check_outputs(args)  # no error


def test_a_failed_save_leaves_no_onnx_file_of_its_run(project, monkeypatch, capsys, tmp_path):
    import compactnn.deployment.ship as ship

    def full_disk(*args, **kwargs):
        raise CompactnnError("no room for the deployed model")

    monkeypatch.setattr(ship, "save_deployed", full_disk)
    assert _deploy("--data", "split.safetensors", "--onnx", "m.onnx", "--save", "dep") == 2
    assert "error: no room for the deployed model" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "dep").exists()


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--threads", "0", "'0' is not a whole number of 1 or more"),
        ("--threads", "two", "'two' is not a whole number of 1 or more"),
        ("--runs", "-1", "'-1' is not a whole number of 1 or more"),
        ("--runs", "0", "'0' is not a whole number of 1 or more"),
        ("--tolerance", "-1", "'-1' is not a finite number of 0 or more"),
        ("--tolerance", "nan", "'nan' is not a finite number of 0 or more"),
        ("--tolerance", "inf", "'inf' is not a finite number of 0 or more"),
    ],
)
def test_numeric_options_are_refused_before_any_work(
    project, monkeypatch, capsys, option, value, words
):
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        _deploy("--data", "split.safetensors", option, value)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: {words}" in err and "Traceback" not in err


def test_tolerance_zero_is_a_valid_strict_check(project, monkeypatch):
    seen = {}
    monkeypatch.setattr(deploy_command, "_models", lambda args: seen.update(vars(args)) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # parsed, then the (stubbed) work began
        _deploy("--tolerance", "0", "--threads", "1", "--runs", "1")
    assert (seen["tolerance"], seen["threads"], seen["runs"]) == (0.0, 1, 1)


def test_option_types_take_good_values_and_name_the_fix():
    assert _common.positive_int("3") == 3
    assert _common.non_negative_float("0") == 0.0
    assert _common.positive_float("1e-3") == pytest.approx(1e-3)
    for parse, text in [
        (_common.positive_int, "1.5"),
        (_common.positive_int, "-2"),
        (_common.positive_float, "0"),
        (_common.positive_float, "-inf"),
        (_common.non_negative_float, "-0.1"),
        (_common.non_negative_float, "NaN"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"{text!r} is not a"):
            parse(text)
    assert not math.isnan(_common.non_negative_float("2"))


def test_deploy_scores_the_held_out_split_and_says_so(project, capsys):
    assert _deploy("--data", "split.safetensors") == 0
    captured = capsys.readouterr()
    qmodel = compactnn.load("art", model=project["factory"].make())
    held_out = evaluate(qmodel, (project["x_test"], project["y_test"]))
    training = evaluate(qmodel, (project["x_train"], project["y_train"]))
    assert held_out != training  # the splits score differently: the line shows which it used
    assert f"top-1 on --data: simulated {held_out:.2f}%" in captured.out
    assert (
        "note: --data holds x_train/y_train and x_test/y_test: verifying, timing and scoring "
        "on x_test/y_test (held out)"
    ) in captured.err


def test_deploy_calibrates_a_model_on_the_training_split(project, monkeypatch, capsys):
    calibrated = []
    compress = compactnn.compress

    def spy(model, recipe, calib_data=None, **kwargs):
        calibrated.append(calib_data)
        return compress(model, recipe, calib_data=calib_data, **kwargs)

    monkeypatch.setattr(compactnn, "compress", spy)
    args = FACTORY_DEPLOY
    assert main([*args, "--no-progress", "--data", "split.safetensors"]) == 0
    assert len(calibrated) == 1 and torch.equal(calibrated[0], project["x_train"])
    err = capsys.readouterr().err
    assert "calibrating on x_train, verifying, timing and scoring on x_test/y_test" in err


def test_deploy_recipe_on_a_one_split_file_says_it_scores_its_calibration_data(project, capsys):
    """eval --recipe said so; deploy --recipe calibrated on the data it scored silently."""
    save_file({"x": project["x_test"], "y": project["y_test"]}, "xy.safetensors")
    args = FACTORY_DEPLOY
    assert main([*args, "--no-progress", "--data", "xy.safetensors"]) == 0
    assert "note: --data holds one split: --recipe calibrates on the data it scores" in (
        capsys.readouterr().err
    )
    assert _deploy("--data", "xy.safetensors") == 0  # an artifact calibrates on nothing
    assert "holds one split" not in capsys.readouterr().err


def test_split_labels_reads_the_split_of_its_role(capsys):
    both = {
        "x_train": torch.zeros(4, 2),
        "y_train": torch.zeros(4, dtype=torch.long),
        "x_test": torch.ones(3, 2),
        "y_test": torch.ones(3, dtype=torch.long),
    }
    x, y = _common.split_labels(both)  # eval, the default: the held-out split
    assert torch.equal(x, both["x_test"]) and torch.equal(y, both["y_test"])
    assert capsys.readouterr().err == (
        "note: --data holds x_train/y_train and x_test/y_test: using x_test/y_test "
        "(the held-out split)\n"
    )
    x, y = _common.split_labels(both, role="train", note=False)
    assert torch.equal(x, both["x_train"]) and capsys.readouterr().err == ""
    plain = {"x": torch.zeros(2, 2), "y": torch.tensor([0, 1])}
    assert _common.split_labels(plain)[1].tolist() == [0, 1]
    assert capsys.readouterr().err == ""  # one labelled split: nothing to say
    inputs = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert _common.split_labels(inputs) == (inputs, None)


@pytest.mark.parametrize("only", ["train", "test"])
def test_a_files_only_split_serves_both_roles_with_a_note(only, capsys):
    data = {f"x_{only}": torch.zeros(4, 2), f"y_{only}": torch.arange(4)}
    for role in ("train", "eval"):
        x, y = _common.split_labels(data, role=role, note=False)
        assert x is data[f"x_{only}"] and y is data[f"y_{only}"]
        err = capsys.readouterr().err
        native = (role == "train") == (only == "train")
        verb = "calibrating on" if role == "train" else "scoring"
        assert err == ("" if native else f"note: --data holds only x_{only}/y_{only}: {verb} it\n")


@pytest.mark.parametrize("target", ["art", "float"])
def test_bad_labels_are_reported_before_loading_deploying_or_timing(
    target, project, capsys, monkeypatch
):
    def slow(*args, **kwargs):
        pytest.fail("loading, compressing or deploying started before the labels were checked")

    for name in ("load", "compress", "deploy"):
        monkeypatch.setattr(compactnn, name, slow)
    save_file({"x": project["x_test"], "y": project["y_test"] + 40}, "badlabels.safetensors")
    if target == "float":
        args = ["deploy", MODEL[1], *MODEL[2:], "--recipe", "w8a8"]
    else:
        args = ["deploy", "art", *MODEL]
    code = main([*args, "--data", "badlabels.safetensors", "--runs", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --data badlabels.safetensors: labels range over [40, 42]")


def test_a_deployed_artifact_is_refused_in_command_line_words(project, capsys, monkeypatch):
    assert _deploy("--data", "split.safetensors", "--save", "dep") == 0
    capsys.readouterr()
    for module, name in ((deploy_command, "skeleton_for"), (compactnn, "load")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("loaded before refusing"))
    code = main(["deploy", "dep", *MODEL, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "'dep' holds a deployed model" in err and "compactnn eval dep" in err
    assert "qmodel" not in err and "deployed.source" not in err


def test_a_training_recipe_is_noted_as_calibrated_without_training(project, capsys):
    args = ["deploy", MODEL[1], *MODEL[2:], "--recipe", "w4a4-lsq", "--data", "split.safetensors"]
    assert main([*args, "--runs", "2", "--quick", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: w4a4-lsq is a training-aware recipe; compress calibrates it without" in err
    assert "compactnn train deploy_cli_factory:make --recipe w4a4-lsq" in err


def test_deploy_of_a_reference_scores_its_held_out_split_on_both_models(
    project, monkeypatch, capsys
):
    """Without labelled --data, a reference model's own held-out top-1 is printed for the
    simulated model and for the deployed model itself (not the simulation twice)."""
    held_out = (project["x_test"], project["y_test"])
    scored = []

    def top1(model):
        scored.append(model)
        return evaluate(model, held_out)

    models = deploy_command._models

    def with_reference(args):
        loaded, *rest = models(args)
        reference = argparse.Namespace(name="toy-ref", metric="top1", evaluate=top1)
        return (dataclasses.replace(loaded, reference=reference), *rest)

    monkeypatch.setattr(deploy_command, "_models", with_reference)
    save_file({"x": project["x_test"]}, "inputs.safetensors")  # no labels: the reference scores
    assert _deploy("--data", "inputs.safetensors") == 0
    out = capsys.readouterr().out
    simulated, deployed = scored
    assert isinstance(deployed, DeployedModel) and not isinstance(simulated, DeployedModel)
    want_sim, want_dep = evaluate(simulated, held_out), evaluate(deployed, held_out)
    assert (
        f"top-1 on toy-ref's held-out split: simulated {want_sim:.2f}%, deployed "
        f"{want_dep:.2f}% (the deployed model itself)"
    ) in out


def test_a_float_advice_that_the_longer_timing_contradicts_is_reconciled():
    from compactnn.measure.float_paths import FloatPaths
    from compactnn.measure.timing import Timing

    def t(ms):
        return Timing(ms / 1e3, ms / 1e3, ms / 1e3, 10, 1, 2)

    advised = dataclasses.make_dataclass("D", ["recommendation"])("ORT fp32 runs it 2.2x faster")
    paths = FloatPaths({"fp32-eager": t(40.0), "ort-fp32": t(20.0), "deployed": t(8.0)})
    paths.winner = "ort-fp32"
    said = deploy_command._disagreement(advised, paths)
    assert said.startswith("the timing above finds the deployed model 2.50x faster than ort-fp32")
    paths.timings["deployed"] = t(25.0)  # the table agrees with the advice: nothing to add
    assert deploy_command._disagreement(advised, paths) is None
    quiet = dataclasses.make_dataclass("D", ["recommendation"])(None)
    assert deploy_command._disagreement(quiet, FloatPaths({"fp32-eager": t(1.0)})) is None


def test_a_deployed_artifact_named_like_an_option_is_shown_as_a_path(project, capsys):
    assert _deploy("--data", "split.safetensors", "--save=-dep") == 0
    capsys.readouterr()
    code = main(["deploy", *MODEL, "--no-progress", "--", "-dep"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "compactnn eval ./-dep --model" in err, err


def test_the_binary_onnx_refusal_speaks_command_line_words():
    """The command line told its user to call compactnn.deploy(...) and save_deployed."""
    from compactnn.export.onnx import BINARY_SHIP

    refusal = CompactnnError(f"ONNX export: binary blocks (c2) have no ONNX form: {BINARY_SHIP}")
    args = argparse.Namespace(onnx="m.onnx", save=None)
    said = deploy_command._refused_onnx(refusal, argparse.Namespace(verification=None), args)
    assert "compactnn.deploy(" not in said and "save_deployed" not in said
    assert "deploy it without --onnx and ship it with --save DIR" in said
