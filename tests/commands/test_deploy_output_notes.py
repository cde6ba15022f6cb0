"""What ``compactnn deploy`` says beside its numbers: a quantized model collapsed to one
output, timings that looked inflated (marked ``*`` as ``eval`` marks them), the float paths
it raced (``torch.compile`` included unless --quick) and the samples ``--save`` stores."""

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.commands import deploy as deploy_command
from compactnn.measure.float_paths import FloatPaths
from compactnn.measure.timing import Timing

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
    with torch.no_grad():  # outputs of about 1e-10, as a random-weight MobileNetV2's
        m[3].weight.mul_(1e-9)
        m[3].bias.mul_(1e-9)
    return m
"""

MODEL = ["--model", "deploy_notes_factory:make", "--weights", "w.safetensors"]


def _timing(median_ms: float, low_ms: float, high_ms: float) -> Timing:
    return Timing(median_ms / 1e3, low_ms / 1e3, high_ms / 1e3, runs=10, warmup=2, threads=2)


def _paths() -> FloatPaths:
    """deploy.log's table: ort-fp32 and deployed spread wide (inflated), the others calm."""
    timings = {
        "fp32-eager": _timing(11.35, 11.08, 13.20),
        "ort-fp32": _timing(1.62, 1.29, 2.49),
        "torch.compile": _timing(5.0, 4.9, 5.1),
        "simulated": _timing(14.13, 13.69, 15.12),
        "deployed": _timing(1.08, 1.02, 13.20),
    }
    return FloatPaths(timings, winner="ort-fp32")


@pytest.fixture
def collapsed(tmp_path, monkeypatch):
    """A w8a8 artifact of a model whose outputs vanish: the quantized one is constant."""
    (tmp_path / "deploy_notes_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import deploy_notes_factory

    model = deploy_notes_factory.make().eval()
    save_file(model.state_dict(), "w.safetensors")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, "x.safetensors")
    compactnn.save(compactnn.compress(model, "w8a8", calib_data=x, progress=False), "art")
    seen = {}

    def fake_race(model, example, **kwargs):  # the table's numbers, without timing
        seen.update(kwargs)
        return _paths()

    monkeypatch.setattr(deploy_command, "fastest_float_path", fake_race)
    return seen


def test_deploy_warns_of_a_collapse_marks_inflated_timings_and_names_stored_samples(
    collapsed, capsys
):
    args = ["deploy", "art", *MODEL, "--data", "x.safetensors", "--save", "dep", "--no-progress"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    # 1. verification passed at 0 steps, but the quantized output is one code for all inputs
    assert "the quantized model's output is the same for all 16 samples while the float" in err
    assert "verification or score against it proves nothing" in err
    # 2. torch.compile raced as eval races it; inflated cells carry *, with eval's footnote
    assert collapsed["quick"] is False
    assert "2 threads, torch.compile among the float paths, every contender" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "1.50x * vs ort-fp32" in rows["deployed"]
    assert "1.08 ms (1.02-13.20) *" in rows["deployed"]
    assert "11.35 ms (11.08-13.20)  " in rows["fp32-eager"]  # calm, but its speedup uses ort
    assert "0.14x * vs ort-fp32" in rows["fp32-eager"]
    assert "5.00 ms   0.32x * vs ort-fp32" in rows["torch.compile"]
    assert "* this timing looked inflated (the reasons are in the warnings above)" in out
    assert "note: deployed faster than the fastest float path (1.08 ms vs 1.62 ms)" in out
    # 4. --save stored inputs of the user's, and says so
    assert (
        "dep/deployment.safetensors holds 8 sample(s) of --data x.safetensors" in out
        and "deploy has no option to leave them out" in out
    )


def test_quick_leaves_torch_compile_out_and_says_so(collapsed, capsys):
    args = ["deploy", "art", *MODEL, "--data", "x.safetensors", "--quick", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert collapsed["quick"] is True and collapsed["runs"] == 3
    assert "median of at least 3 runs" in out and "torch.compile among" not in out
    assert "saved the deployed model" not in out and "deployment.safetensors" not in out


def test_compress_warns_of_a_collapse_too(collapsed, capsys):
    """compress ran no comparison with the float model: a collapsed model was saved without
    a word (T3's random-weight MobileNetV2)."""
    args = ["compress", "deploy_notes_factory:make", "--weights", "w.safetensors", "-r", "w8a8"]
    args += ["--data", "x.safetensors", "--out", "art2"]
    assert main([*args, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: the quantized model's output is the same for all 16 samples" in err


def test_compress_of_a_healthy_model_does_not_warn(tmp_path, monkeypatch, capsys):
    (tmp_path / "healthy_factory.py").write_text(FACTORY.replace("mul_(1e-9)", "mul_(1.0)"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import healthy_factory

    save_file(healthy_factory.make().state_dict(), "w.safetensors")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, "x.safetensors")
    args = ["compress", "healthy_factory:make", "--weights", "w.safetensors"]
    assert main([*args, "-r", "w8a8", "--data", "x.safetensors", "-o", "a", "--no-progress"]) == 0
    assert "output is the same for all" not in capsys.readouterr().err
