"""Resident memory of a report row: the builders rebuild exactly the delivered model, and a
measurement fills the row (or becomes a note)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.measure import memory
from compactnn.measure.memory import ResidentMemory
from compactnn.report import resident
from compactnn.report.resident import build, measure_rows, memory_job, save_inputs, setup
from compactnn.report.writer import resident_cell
from tests.report._nets import X, cnn

_cnn = cnn


def _saved(tmp_path, model: nn.Module, recipe: str, calib=X) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "channel pruning skipped: the outputs"
        qmodel = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    path = tmp_path / recipe
    compactnn.save(qmodel, path)
    return str(path)


@pytest.fixture
def cnn_inputs(tmp_path):
    model = _cnn()
    return model, save_inputs(tmp_path / "inputs", model, X[:8])


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_the_cnn_builder_runs_the_artifact_deployed_on_the_rows_backend(
    tmp_path, cnn_inputs, backend
):
    pytest.importorskip("onnxruntime")
    model, (model_path, batch_path) = cnn_inputs
    artifact = _saved(tmp_path, model, "w8a8")
    forward = build(setup(batch_path, model_path), artifact, "deploy", backend, 1)
    # independently: the artifact loaded into the float model and deployed by hand
    expected = compactnn.deploy(
        compactnn.load(artifact, model=model), backend=backend, example=X[:8], time_float=False
    )
    with torch.no_grad():
        assert torch.equal(forward(), expected(X[:8]))
        assert forward.args[0].backend == backend  # no race: the row's backend


def test_the_float_and_simulated_builders_run_the_float_path_and_the_simulation(
    tmp_path, cnn_inputs
):
    model, (model_path, batch_path) = cnn_inputs
    with torch.no_grad():
        want = model(X[:8])
        eager = build(setup(batch_path), model_path, "float", "fp32-eager", 1)
        assert torch.equal(eager(), want)
        bf16 = build(setup(batch_path), model_path, "float", "bf16-autocast", 1)
        assert bf16().dtype == torch.bfloat16 and torch.allclose(bf16().float(), want, atol=0.1)
        artifact = _saved(tmp_path, model, "w2a4")
        sim = build(setup(batch_path, model_path), artifact, "as-is", None, 1)
        assert torch.equal(sim(), compactnn.load(artifact, model=model)(X[:8]))
        assert not any(p.is_meta for p in sim.args[0].parameters())


def test_the_kernels_builder_loads_the_artifact_straight_into_kernels(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    calib = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    artifact = _saved(tmp_path, model, "w8", calib)
    model_path, batch_path = save_inputs(tmp_path / "in", model, calib[:4])
    forward = build(setup(batch_path, model_path), artifact, "kernels", None, 1)
    with torch.no_grad():
        expected = compactnn.to_kernels(compactnn.load(artifact, model=model))(calib[:4])
        assert torch.equal(forward(), expected)
    assert forward.args[0]._compactnn_kernels["swapped"]


def test_memory_job_follows_the_rows_delivery():
    class Deployed:
        is_deployed, backend = True, "onnxruntime"

    assert memory_job("cnn", "float", "ONNX Runtime fp32", None, "ort-fp32") == (
        "float",
        "ort-fp32",
    )
    assert memory_job("cnn", "w8a8", "ONNX Runtime int8", Deployed(), "x") == (
        "deploy",
        "onnxruntime",
    )
    assert memory_job("transformer", "w4", "kernels bfloat16", nn.Linear(1, 1), "x") == (
        "kernels",
        None,
    )
    assert memory_job("cnn", "ch50", "PyTorch bf16 autocast", None, "x") == (
        "float-path",
        "bf16-autocast",
    )
    assert memory_job("transformer", "p", "PyTorch fp32 (probe-pruned)", None, "x")[0] == "as-is"
    with pytest.raises(ValueError, match="no builder"):
        memory_job("cnn", "w8a8", "some new runtime", None, "x")


def test_measure_rows_fills_what_resident_memory_returned_and_notes_a_failure(monkeypatch):
    calls = []

    def fake(builder, args, **kw):
        calls.append((builder, args, kw))
        if args[0] == "broken":
            raise compactnn.CompactnnError("the child process failed: no such artifact")
        return ResidentMemory(before=100, after=100 + 7 * len(args[0]), peak=999, anon_before=10,
                              anon_after=12)  # fmt: skip

    monkeypatch.setattr(memory, "resident_memory", fake)
    rows = [{"notes": []}, {"notes": []}]
    jobs = [
        {"artifact": "out/w8a8", "delivery": "deploy", "detail": "onednn", "batch": "b.pt",
         "skeleton": "f.pt"},
        {"artifact": "broken", "delivery": "as-is", "detail": None, "batch": "b.pt",
         "skeleton": "f.pt"},
    ]  # fmt: skip
    measure_rows(list(zip(rows, jobs, strict=True)), threads=2)
    assert rows[0]["resident_bytes"] == 7 * len("out/w8a8")
    assert rows[0]["resident_anon_bytes"] == 2 and rows[0]["notes"] == []
    assert "resident_bytes" not in rows[1]
    assert rows[1]["notes"] == [
        "resident memory not measured: CompactnnError: the child process failed: no such artifact"
    ]
    builder, args, kw = next(c for c in calls if c[1][0] == "out/w8a8")  # two threads: any order
    assert builder == "compactnn.report.resident:build"
    assert args == ["out/w8a8", "deploy", "onednn", 2]
    assert kw["setup"] == "compactnn.report.resident:setup"
    assert kw["setup_args"] == ["b.pt", "f.pt"] and kw["threads"] == 2
    assert set(kw["preload"]) <= set(resident.PRELOAD) and "compactnn.methods" in kw["preload"]
    assert resident_cell(rows[1]) == "-"


NO_PICKLE = """
import os, pickle, torch, torch.serialization

def refuse(*args, **kwargs):
    raise RuntimeError("unpickling is forbidden in this child")

torch.load = torch.serialization.load = pickle.load = pickle.loads = refuse
with open(os.environ["F3_MARKS"], "a") as f:
    f.write(f"{os.getpid()}\\n")
"""


def test_children_measure_rows_with_unpickling_forbidden(tmp_path, cnn_inputs, monkeypatch):
    """Each child first imports a module that replaces torch.load and pickle's loaders by a
    refusal (and marks that it ran): the float row and a compressed row are still measured,
    from safetensors files only, with a positive number."""
    model, inputs = cnn_inputs
    assert all(p.endswith(".safetensors") for p in inputs)
    (tmp_path / "f3_no_pickle.py").write_text(NO_PICKLE)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("F3_MARKS", str(tmp_path / "marks"))
    monkeypatch.setattr(resident, "installed_preload", lambda: ("f3_no_pickle", "compactnn"))
    artifact = _saved(tmp_path, model, "w4a8")
    jobs = [
        resident.job(artifact, "float", "fp32-eager", inputs),
        resident.job(artifact, "as-is", None, inputs),
    ]
    rows = [{"notes": []}, {"notes": []}]
    measure_rows(list(zip(rows, jobs, strict=True)), threads=1)
    assert len(set((tmp_path / "marks").read_text().split())) == 2  # two children, patched
    for row in rows:  # the model adds its weights and workspaces, far below torch's own maps
        assert row["notes"] == [] and 0 < row["resident_bytes"] < 200 * 2**20, row


def _refuse(*args, **kwargs):
    raise AssertionError("torch.load called")


def test_setup_and_build_never_call_torch_load(tmp_path, cnn_inputs, monkeypatch):
    model, (model_path, batch_path) = cnn_inputs
    artifact = _saved(tmp_path, model, "w8a8")
    monkeypatch.setattr(torch, "load", _refuse)
    monkeypatch.setattr(torch.serialization, "load", _refuse)
    with torch.no_grad():
        eager = build(setup(batch_path), model_path, "float", "fp32-eager", 1)
        assert torch.equal(eager(), model(X[:8]))
        sim = build(setup(batch_path, model_path), artifact, "as-is", None, 1)
        assert torch.equal(sim(), compactnn.load(artifact, model=model)(X[:8]))
