"""``compactnn eval``: what it writes (``--json`` never destroys a file) and the size it
reports for a deployed artifact."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.commands._common import human_bytes
from compactnn.measure.size import artifact_bytes

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))
"""
MODEL = ["--model", "eval_out_factory:make", "--weights", "w.safetensors"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A factory, its weights, inputs, and a w8a8 artifact of it."""
    (tmp_path / "eval_out_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import eval_out_factory

    model = eval_out_factory.make().eval()
    save_file(model.state_dict(), "w.safetensors")
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, "x.safetensors")
    q = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    compactnn.save(q, "art")
    return {"q": q, "x": x}


def _eval(target, *extra):
    return main(["eval", target, *MODEL, "--quick", "--no-progress", "--threads", "1", *extra])


def _no_work(monkeypatch):
    from compactnn.commands import evaluate as command
    from compactnn.report import delivery

    def slow(*args, **kwargs):
        pytest.fail("loading, deployment or timing started before --json was refused")

    monkeypatch.setattr(compactnn, "load", slow)
    for name in ("deliver", "deliver_float"):
        monkeypatch.setattr(delivery, name, slow)
    monkeypatch.setattr(command, "fastest_float_path", slow)
    monkeypatch.setattr(command, "evaluate", slow)


@pytest.mark.parametrize(
    "victim, said",
    [
        ("w.safetensors", "is the --weights file"),
        ("x.safetensors", "is the --data file"),
        ("art/model.safetensors", "is a file inside the MODEL_OR_ARTIFACT folder 'art'"),
        ("eval_out_factory.py", "is the --model file"),  # the factory's source
        ("notes.txt", None),  # not an input: an existing file
    ],
)
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_json_never_overwrites_an_input_and_an_existing_file_needs_force(
    victim, said, force, project, capsys, monkeypatch
):
    if victim == "notes.txt":
        Path(victim).write_text("my notes\n")
    before = open(victim, "rb").read()
    _no_work(monkeypatch)
    if said is None and force:
        return  # --force replaces it: the next test
    assert _eval("art", "--data", "x.safetensors", "--json", victim, *force) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    if said is None:
        assert err == f"error: --json {victim!r} exists; pass --force to replace it."
    else:
        assert err.startswith(f"error: --json {victim!r} {said}: writing there would destroy")
        assert "--force or not" in err and "--json eval.json" in err
    assert open(victim, "rb").read() == before  # byte for byte


def test_json_force_replaces_an_earlier_report(project, capsys):
    with open("r.json", "w") as f:
        f.write("an earlier report\n")
    assert _eval("art", "--data", "x.safetensors", "--simulated", "--json", "r.json") == 2
    assert open("r.json").read() == "an earlier report\n"
    assert "pass --force to replace it" in capsys.readouterr().err
    assert (
        _eval("art", "--data", "x.safetensors", "--simulated", "--json", "r.json", "--force") == 0
    )
    rows = json.loads(open("r.json").read())["rows"]
    assert [r["model"] for r in rows] == ["float", "compressed"]
    assert rows[1]["size_bytes"] == artifact_bytes("art")


def test_a_deployed_artifact_reports_every_file_its_verification_batch_included(project, capsys):
    from compactnn.deployment.ship import save_deployed

    fast = compactnn.deploy(project["q"], "onednn", example=project["x"])
    big = torch.randn(8, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    save_deployed(fast, "dep", example=big)  # a verification batch of big inputs
    batch_bytes = open("dep/deployment.safetensors", "rb").seek(0, 2)
    assert batch_bytes > 8 * 3 * 96 * 96 * 4
    assert _eval("dep", "--json", "r.json") == 0
    out = capsys.readouterr().out
    result = json.loads(open("r.json").read())
    rows = {r["model"]: r for r in result["rows"]}
    header_extra = open("dep/compactnn.json").seek(0, 2) - open("art/compactnn.json").seek(0, 2)
    assert 0 < header_extra < 2048
    files = sum(p.stat().st_size for p in Path("dep").iterdir())
    assert (
        rows["deployed"]["size_bytes"]
        == files
        == artifact_bytes("art") + header_extra + (batch_bytes)
    )
    assert result["verification_batch_bytes"] == batch_bytes
    assert "counts every file of the artifact, the verification batch stored beside" in out
    assert f"the model alone: {human_bytes(files - batch_bytes)})" in out


def test_unstructured_sparsity_is_shown_as_no_speedup_and_channel_pruning_keeps_one(
    project, capsys
):
    import eval_out_factory

    model, x = eval_out_factory.make().eval(), project["x"]
    compactnn.save(compactnn.compress(model, "sp50", calib_data=x, progress=False), "sp")
    assert _eval("sp", "--data", "x.safetensors", "--json", "sp.json") == 0
    out = capsys.readouterr().out
    row = json.loads(open("sp.json").read())["rows"][1]
    assert row["speedup"] is None and row["no_speedup"] == "none (dense)"
    table = next(line for line in out.splitlines() if line.startswith("compressed"))
    assert table.rstrip().endswith("none (dense)")
    assert "no speedup claimed: the compressed model keeps every weight shape" in out
    natively = next(line for line in out.splitlines() if line.startswith("  runs natively"))
    assert " ms" not in natively  # one measurement: the row's
    model = eval_out_factory.make().eval()
    compactnn.save(compactnn.compress(model, "ch50", calib_data=x, progress=False), "ch")
    assert _eval("ch", "--data", "x.safetensors", "--json", "ch.json") == 0
    row = json.loads(open("ch.json").read())["rows"][1]
    assert row["speedup"] > 0 and "no_speedup" not in row
