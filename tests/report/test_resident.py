"""Resident memory of a report row: the builders rebuild exactly the delivered model, and a
measurement fills the row (or becomes a note)."""

from __future__ import annotations

import json
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
    assert set(kw["preload"]) <= set(resident.PRELOAD) and "compactnn" in kw["preload"]
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


def test_the_float_model_is_rebuilt_by_trusted_constructors(tmp_path):
    """torch.nn and compactnn classes are rebuilt from data (attributes, shared modules,
    non-persistent buffers, frozen parameters kept); outputs equal the original's."""
    from compactnn.models.mnist_cnn import MnistCNN

    torch.manual_seed(0)
    mnist = MnistCNN().eval()
    with torch.no_grad():  # statistics other than a fresh model's
        for bn in (m for m in mnist.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    shared = nn.Linear(6, 6)
    net = nn.Sequential(nn.Conv1d(2, 3, 3, padding="same"), nn.Flatten(), nn.Linear(12, 6),
                        shared, nn.GELU(approximate="tanh"), shared).eval()  # fmt: skip
    net[2].weight.requires_grad_(False)
    net[0].register_buffer("scale", torch.tensor([2.0]), persistent=False)
    for model, x in ((mnist, torch.randn(2, 1, 28, 28)), (net, torch.randn(2, 2, 4))):
        model_path, batch_path = save_inputs(tmp_path / type(model).__name__, model, x)
        rebuilt = resident.rebuild_float(model_path)
        assert type(rebuilt) is type(model) and not rebuilt.training
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x))
        assert torch.equal(resident.load_batch(batch_path), x)
    assert rebuilt[3] is rebuilt[5] and not rebuilt[2].weight.requires_grad
    assert rebuilt[0].scale.item() == 2.0 and "scale" not in rebuilt.state_dict()
    assert rebuilt[0].padding == "same" and rebuilt[0].kernel_size == (3,)


FACTORY = """
from torch import nn

class Own(nn.Module):  # a class of the user's, not torch.nn's
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).relu()

def make():
    return Own()
"""


def test_a_user_class_is_rebuilt_only_from_the_model_the_user_named(tmp_path, monkeypatch):
    import importlib

    from safetensors.torch import save_file

    (tmp_path / "f3_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    own = importlib.import_module("f3_factory").make().eval()
    with pytest.raises(ValueError, match=r"Own is a f3_factory:Own, not a class of torch\.nn"):
        save_inputs(tmp_path / "a", own, torch.ones(2, 4))
    save_file(own.state_dict(), tmp_path / "w.safetensors")
    source = {"model": "f3_factory:make", "weights": str(tmp_path / "w.safetensors")}
    model_path, _ = save_inputs(tmp_path / "b", own, torch.ones(2, 4), source)
    rebuilt = resident.rebuild_float(model_path)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), own(x))


@pytest.mark.parametrize(
    "name, needle",
    [("os:system", "not from torch.nn or compactnn"),
     ("torch.nn.functional:relu", "not an nn.Module class")],
)  # fmt: skip
def test_a_record_naming_other_code_is_refused(tmp_path, name, needle):
    from safetensors.torch import save_file

    node = {"class": name, "training": False, "attrs": {}, "params": {}, "buffers": {},
            "volatile": [], "children": {}}  # fmt: skip
    record = {"route": "modules", "nodes": [node]}
    path = tmp_path / "float.safetensors"
    save_file({"0": torch.zeros(1)}, path, metadata={resident.RECORD: json.dumps(record)})
    with pytest.raises(ValueError, match=needle):
        resident.rebuild_float(str(path))


def test_batches_keep_their_form_and_a_non_tensor_is_refused(tmp_path):
    x, m = torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long)
    for i, batch in enumerate([x, (x, m), [x], {"input_ids": m, "attention_mask": m[:, :2]}]):
        resident.save_batch(tmp_path / f"{i}.safetensors", batch)
        back = resident.load_batch(str(tmp_path / f"{i}.safetensors"))
        assert type(back) is type(batch)
        pairs = batch.items() if isinstance(batch, dict) else enumerate([batch])
        got = back.items() if isinstance(back, dict) else enumerate([back])
        for (k, a), (j, b) in zip(pairs, got, strict=True):
            assert k == j and all(map(torch.equal, a if isinstance(a, list | tuple) else [a],
                                      b if isinstance(b, list | tuple) else [b]))  # fmt: skip
    with pytest.raises(ValueError, match="'mask' is not a tensor"):
        resident.save_batch(tmp_path / "bad.safetensors", {"x": x, "mask": None})


def test_a_hugging_face_model_is_rebuilt_from_its_config_and_state(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    bert = transformers.BertForMaskedLM(config).eval()  # decoder tied to the embeddings
    ids = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8).long()}
    model_path, _ = save_inputs(tmp_path, bert, ids)
    rebuilt = resident.rebuild_float(model_path)
    with torch.no_grad():
        assert torch.equal(rebuilt(**ids).logits, bert(**ids).logits)
    assert rebuilt.cls.predictions.decoder.weight is rebuilt.bert.embeddings.word_embeddings.weight
