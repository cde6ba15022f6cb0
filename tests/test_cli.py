"""The command line: every bad input gets ``error: ...``, exit code 2 and no traceback; a
small compress -> eval round trip works end to end."""

from __future__ import annotations

import copy
import json
import os
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compactnn
from compactnn import cli
from compactnn.cli import main
from tests._cli import run_cli

TINYNET = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make():
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 4))
    """
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user project: a factory module, its weights, and calibration data files."""
    (tmp_path / "cli_tinynet.py").write_text(TINYNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, tmp_path / "x.safetensors")
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "bad.npy", np.zeros((8, 3), dtype=np.float32))
    return tmp_path, model, x


def assert_user_error(capsys, argv, *needles: str) -> str:
    code, _out, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


FACTORY = ["cli_tinynet:make", "--weights", "w.safetensors"]


def test_compress_then_eval_round_trip(project, capsys):
    tmp, model, x = project
    code, out, err = run_cli(
        capsys, "compress", *FACTORY, "-r", "w4a8", "-d", "x.npy", "-o", "art", "--no-progress"
    )
    assert code == 0, err
    assert "x smaller" in out
    # the artifact matches the library API result exactly
    expected = compactnn.compress(model, "w4a8", calib_data=x, progress=False)
    loaded = compactnn.load(tmp / "art", model=model)
    assert torch.equal(loaded(x), expected(x))
    code, out, err = run_cli(
        capsys,
        "eval",
        "art",
        "--model",
        *FACTORY,
        "-d",
        "x.safetensors",
        "--quick",
        "--json",
        "r.json",
    )
    assert code == 0, err
    rows = json.loads((tmp / "r.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["float", "w4a8"]
    assert rows[0]["quality"] == pytest.approx(1.0)
    assert 0.95 < rows[1]["quality"] < 1.0  # output cosine vs float of a 4-bit middle layer
    assert rows[1]["size_bytes"] < rows[0]["size_bytes"] / 2.5


def test_eval_model_with_recipe_in_memory(project, capsys):
    code, out, err = run_cli(capsys, "eval", *FACTORY, "-r", "w8", "-d", "x.npy", "--quick")
    assert code == 0, err
    assert "float" in out and "w8" in out


def test_export_archive_is_a_model(project, capsys):
    tmp, model, x = project
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x[:4],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp / "m.pt2"))
    code, _out, err = run_cli(
        capsys, "compress", "m.pt2", "-r", "w8a8", "-d", "x.npy", "-o", "pt2art", "--no-progress"
    )
    assert code == 0, err
    header = json.loads((tmp / "pt2art" / "compactnn.json").read_text())
    assert len(header["layers"]) == 3  # every aten.linear became a quantized Linear


def test_existing_artifact_needs_force(project, capsys):
    args = ["compress", *FACTORY, "-r", "w8", "-o", "art", "--no-progress"]
    assert run_cli(capsys, *args)[0] == 0
    before = (project[0] / "art" / "model.safetensors").read_bytes()
    assert_user_error(capsys, args, "already holds a compactnn artifact", "--force")
    assert (project[0] / "art" / "model.safetensors").read_bytes() == before  # lost nothing
    assert run_cli(capsys, *args, "--force")[0] == 0


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["compress", "no-such-model", "-r", "w8"], ["unknown model 'no-such-model'", ".pt2"]),
        (["compress", *FACTORY, "-r", "w5z"], ["unknown recipe 'w5z'", "w<W>[a<A>[g|d]]"]),
        (["compress", *FACTORY, "-r", "w9a8"], ["bits=9", "1..8"]),
        (["compress", *FACTORY, "-r", "w4-g5"], ["group"]),
        (["compress", *FACTORY, "-r", "w8a8", "-d", "bad.npy"], ["(8, 3)", "Expected input"]),
        (["compress", *FACTORY, "-r", "w8", "-d", "nope.npy"], ["does not exist"]),
        (["compress", *FACTORY, "-r", "w8", "-d", "data.pt"], ["pickle"]),
        (["compress", "cli_tinynet:make", "-r", "w8"], ["--weights"]),
        (
            ["compress", "cli_tinynet:nothing", "--weights", "w.safetensors", "-r", "w8"],
            ["cannot import factory"],
        ),
        (
            ["compress", "cli_tinynet.py:make", "--weights", "w.safetensors", "-r", "w8"],
            ["cannot import factory", "(a file name: write cli_tinynet:make)"],
        ),
        (["compress", *FACTORY, "-r", "missing.yaml"], ["does not exist"]),
        (["eval", "no_such_dir_or_model"], ["unknown model"]),
    ],
)
def test_bad_inputs_are_clear_errors(project, capsys, argv, needles):
    assert_user_error(capsys, argv, *needles)


def test_pickle_is_refused_unless_trusted(project, capsys):
    tmp, model, _x = project
    torch.save(model, tmp / "model.pt")
    err = assert_user_error(
        capsys,
        ["compress", "model.pt", "-r", "w8", "-o", "p"],
        "pickle",
        "arbitrary code",
        "--trust-pickle",
    )
    assert not (tmp / "p").exists()
    assert "refusing" in err
    code, _out, err = run_cli(
        capsys, "compress", "model.pt", "-r", "w8", "-o", "p", "--trust-pickle", "--no-progress"
    )
    assert code == 0, err


def test_eval_detects_a_tampered_artifact(project, capsys):
    tmp = project[0]
    assert run_cli(capsys, "compress", *FACTORY, "-r", "w8", "-o", "art", "--no-progress")[0] == 0
    blob = bytearray((tmp / "art" / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp / "art" / "model.safetensors").write_bytes(bytes(blob))
    assert_user_error(capsys, ["eval", "art"], "model.safetensors", "modified")


def test_recipes_lists_forms_and_methods(capsys):
    code, out, _err = run_cli(capsys, "recipes")
    assert code == 0
    assert "w<W>[a<A>[g|d]][-g<G>][-<method>]" in out and "rtn" in out


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "x"])  # --recipe missing
    assert exc.value.code == 2


def test_demo_refuses_an_existing_report(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert_user_error(capsys, ["demo", "--out", str(tmp_path)], "already holds a demo report")
    assert (tmp_path / "results.json").read_text() == "{}"


@pytest.mark.slow
def test_hugging_face_directory(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(tmp_path / "hf")
    ids = {"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": torch.ones(4, 8).long()}
    save_file(ids, tmp_path / "ids.safetensors")
    code, _out, err = run_cli(
        capsys,
        "compress",
        "hf",
        "-r",
        "w8a8",
        "-d",
        "ids.safetensors",
        "-o",
        "art",
        "--no-progress",
    )
    assert code == 0, err
    # the artifact records the architecture: it loads without a skeleton, bit-exact
    qmodel = compactnn.load(tmp_path / "art")
    again = compactnn.load(tmp_path / "art")
    assert torch.equal(qmodel(**ids).last_hidden_state, again(**ids).last_hidden_state)
    code, out, err = run_cli(
        capsys, "eval", "art", "--model", "hf", "-d", "ids.safetensors", "--quick"
    )
    assert code == 0, err
    assert "w8a8" in out


# --- issue 11: user mistakes give one `error:` line and exit 2, checked before slow work ---

RTN_YAML = "steps:\n  - method: rtn\n    {}\n"


def _one_error_line(capsys, argv, *needles: str) -> str:
    err = assert_user_error(capsys, argv, *needles)
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("config: {act: {granularity: tensor, percentile: abc}}", "act.percentile='abc'"),
        ("targets: []", "targets=[] must be a mapping"),
        ("config: {weight: {bits: true}}", "weight.bits=True"),
        ("config: {weight: {bits: 4, symmetric: 'false'}}", "weight.symmetric='false'"),
    ],
)
def test_bad_yaml_recipe_fields(project, capsys, body, needle):
    (project[0] / "r.yaml").write_text(RTN_YAML.format(body))
    _one_error_line(capsys, ["compress", *FACTORY, "-r", "r.yaml"], needle)


def test_unknown_top_level_recipe_key(project, capsys):
    (project[0] / "r.yaml").write_text("nmae: x\nsteps: [{method: rtn}]\n")
    _one_error_line(capsys, ["compress", *FACTORY, "-r", "r.yaml"], "unknown key(s) ['nmae']")


def test_out_under_proc_is_refused_before_loading_the_model(project, capsys):
    # an unknown model would fail too: the --out message proves the check comes first
    _one_error_line(capsys, ["compress", "no-such-model", "-r", "w8", "-o", "/proc/x"], "/proc")


def test_out_that_is_an_existing_file(project, capsys):
    (project[0] / "taken").write_text("")
    _one_error_line(
        capsys, ["compress", "no-such-model", "-r", "w8", "-o", "taken"], "is not a directory"
    )


def test_out_below_a_file(project, capsys):
    (project[0] / "taken").write_text("")
    _one_error_line(
        capsys, ["compress", "no-such-model", "-r", "w8", "-o", "taken/art"], "is not a directory"
    )


def test_out_not_writable(project, capsys, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as if read-only (or not root)
    _one_error_line(
        capsys, ["compress", "no-such-model", "-r", "w8", "-o", "ro/art"], "not writable"
    )


def test_nan_in_data_file(project, capsys):
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    x[5, 2] = np.nan
    np.save(project[0] / "nan.npy", x)
    _one_error_line(
        capsys, ["compress", *FACTORY, "-r", "w8a8", "-d", "nan.npy", "-o", "a"], "1 NaN"
    )


def test_half_precision_model(project, capsys):
    tmp = project[0]
    (tmp / "cli_halfnet.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Linear(16, 4)).half()\n"
    )
    save_file(nn.Sequential(nn.Linear(16, 4)).half().state_dict(), tmp / "h.safetensors")
    argv = ["compress", "cli_halfnet:make", "--weights", "h.safetensors", "-r", "w8", "-o", "a"]
    _one_error_line(capsys, argv, "torch.float16", "model.float()")


def test_disk_full_while_saving_is_one_line(project, capsys, monkeypatch):
    import errno

    def full(model, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(compactnn, "save", full)
    _one_error_line(
        capsys, ["compress", *FACTORY, "-r", "w8", "-o", "art", "--no-progress"],
        "'art': No space left on device", "free some disk space",
    )  # fmt: skip


def test_os_error_without_a_filename_is_a_bug_and_keeps_its_traceback(project, monkeypatch):
    import errno

    def broken(model, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compactnn, "save", broken)
    with pytest.raises(OSError, match="No space"):
        main(["compress", *FACTORY, "-r", "w8", "-o", "art", "--no-progress"])


@pytest.mark.parametrize(
    ("code", "needle"),
    [("ENOSPC", "free some disk space"), ("EFBIG", "file-size limit (ulimit -f)")],
)
def test_a_full_disk_inside_a_writer_is_one_line_and_keeps_the_old_artifact(
    project, capsys, monkeypatch, code, needle
):
    """``f.write`` on a full disk raises an OSError without a filename: the save names the
    file it was writing, and the artifact that was there still loads, bit-exact."""
    import errno

    from compactnn.export import artifact

    assert main(["compress", *FACTORY, "-r", "w8", "-o", "art", "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in (project[0] / "art").iterdir()}

    def half_then_full(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(artifact, "write_tensors", half_then_full)
    capsys.readouterr()
    argv = ["compress", *FACTORY, "-r", "w4-g16", "-o", "art", "--force", "--no-progress"]
    err = _one_error_line(capsys, argv, os.strerror(getattr(errno, code)), needle)
    assert err.startswith("error: 'art/.cnn-") and "-model.safetensors': " in err
    assert {p.name: p.read_bytes() for p in (project[0] / "art").iterdir()} == before


PLUGIN = textwrap.dedent(
    """
    import dataclasses

    import torch

    from compactnn.core.config import MethodConfig
    from compactnn.registry import register


    @dataclasses.dataclass(frozen=True)
    class ScaleConfig(MethodConfig):
        factor: float = 0.5


    @register("cli_scale", ScaleConfig, "scale every weight")
    def apply_scale(model, targets, config, ctx):
        with torch.no_grad():
            for layer in targets.values():
                layer.weight.mul_(config.factor)
        return model
    """
)
SCALE_RECIPE = "name: scaled\nsteps:\n  - method: cli_scale\n    config: {factor: 0.25}\n"


@pytest.fixture
def plugin(project):
    """A third-party method ``cli_scale`` in module ``cli_plugin`` of the project folder;
    unregistered (and the module forgotten) afterwards."""
    import sys

    from compactnn import registry

    (project[0] / "cli_plugin.py").write_text(PLUGIN)
    (project[0] / "scaled.yaml").write_text(SCALE_RECIPE)
    yield "cli_plugin"
    entry = registry.METHODS.pop("cli_scale", None)
    if entry is not None:
        registry.METHODS_BY_CONFIG.pop(entry.config_cls, None)
    sys.modules.pop("cli_plugin", None)


def test_plugin_method_runs_from_the_command_line(project, plugin, capsys):
    tmp, model, x = project
    argv = ["compress", *FACTORY, "-r", "scaled.yaml", "-o", "art", "--no-progress"]
    err = assert_user_error(capsys, argv, "unknown method 'cli_scale'", "--plugin MODULE")
    assert err.count("\n") == 1  # one line
    code, _out, err = run_cli(capsys, *argv, "--plugin", plugin)
    assert code == 0, err
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in reference:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(0.25)
    loaded = compactnn.load(tmp / "art", model=model)
    torch.testing.assert_close(loaded(x), reference(x), rtol=1e-6, atol=1e-6)


def test_plugin_that_cannot_be_imported_is_one_line(project, capsys):
    argv = ["compress", *FACTORY, "-r", "w8", "-o", "art", "--no-progress"]
    assert_user_error(capsys, [*argv, "--plugin", "no_such_plugin"], "--plugin 'no_such_plugin'")
    assert_user_error(capsys, [*argv, "--plugin", "plug/p.py"], "--plugin p")
    assert not (project[0] / "art").exists()


def test_every_command_that_reads_recipes_or_artifacts_takes_plugin():
    parser = cli.build_parser()
    for command in ("compress", "eval", "train", "deploy", "search", "export", "report"):
        sub = parser._subparsers._group_actions[0].choices[command]
        assert "--plugin" in sub._option_string_actions, command
