"""The demo pipeline on tiny stand-in reference models (the real ones are too slow here)."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from torch import nn

from compactnn.demo import group_suite, run_demo
from compactnn.errors import CompactnnError


class TinyRef:
    """A stand-in with the interface of ``compactnn.models.Reference``."""

    metric = "top1"
    kind = "cnn"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 128),  # the middle layer: the only one below 8 bits
            nn.ReLU(),
            nn.Linear(128, 4),
        ).eval()
        g = torch.Generator().manual_seed(1)
        self.calib = torch.randn(32, 1, 6, 6, generator=g)
        self.test_x = torch.randn(64, 1, 6, 6, generator=g)
        with torch.no_grad():
            self.labels = self.model(self.test_x).argmax(1)  # float is 100% by construction
        self.example = self.test_x[:8]
        self._skeleton = copy.deepcopy(self.model)

    def evaluate(self, model: nn.Module) -> float:
        with torch.no_grad():
            return 100.0 * float((model(self.test_x).argmax(1) == self.labels).float().mean())

    def skeleton(self) -> nn.Module:
        return copy.deepcopy(self._skeleton)


SUITE = [("tiny", "float"), ("tiny", "w8a8"), ("tiny", "w4a8"), ("tiny", "w2a4")]


MEASURED = []  # (job args, setup args, the model's output, bytes returned) per memory child
ONE_AT_A_TIME = threading.Lock()  # the children run two at a time; here they share a process


def fake_resident_memory(builder, args, *, preload, threads, setup, setup_args, **kw):
    """Stands in for the child process: runs the builders here, returns made-up bytes."""
    from compactnn.measure.memory import ResidentMemory
    from compactnn.report import resident

    assert builder == f"{resident.HERE}:build" and setup == f"{resident.HERE}:setup"
    with ONE_AT_A_TIME, torch.no_grad():
        out = resident.build(resident.setup(*setup_args), *args)()
        added = 1000 * (len(MEASURED) + 1)
        MEASURED.append((args, setup_args, out, added))
    return ResidentMemory(before=10**8, after=10**8 + added, peak=2 * 10**8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from compactnn.measure import memory

    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "resident_memory", fake_resident_memory)
        results = run_demo(
            out, quick=True, threads=1, suite=SUITE, loader=lambda _n: TinyRef(), progress=False
        )
    return out, results


def test_group_suite_puts_float_first_and_keeps_order():
    grouped = group_suite([("a", "w8a8"), ("b", "w4"), ("a", "float"), ("a", "w4a8")])
    assert grouped == {"a": ["float", "w8a8", "w4a8"], "b": ["float", "w4"]}


def test_demo_rows_measure_every_recipe(demo):
    out, results = demo
    rows = {r["recipe"]: r for r in results["rows"]}
    assert list(rows) == ["float", "w8a8", "w4a8", "w2a4"]
    assert rows["float"]["quality"] == 100.0 and rows["float"]["size_ratio"] == 1.0
    assert rows["w8a8"]["quality"] >= 95.0  # 8-bit RTN barely moves a tiny net
    for r in rows.values():
        assert r["bit_exact_load"] is True
        assert (out / r["artifact"] / "compactnn.json").is_file()
        # three rounds of equal blocks, each grown to about 0.1 s for a fast model
        assert r["latency"]["runs"] % 3 == 0 and r["latency"]["threads"] == 1
    # smaller bit-widths give smaller artifacts, and the float one is the largest
    sizes = [rows[k]["size_bytes"] for k in ("float", "w8a8", "w4a8", "w2a4")]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]
    assert rows["w8a8"]["size_ratio"] > 3.0  # float32 -> int8 codes, small overheads


def test_demo_reports_layer_formats_and_folded_bn(demo):
    _out, results = demo
    w4 = next(r for r in results["rows"] if r["recipe"] == "w4a8")
    # first and last layers keep 8 bits by convention; the middle one gets 4
    assert set(w4["layers"]) == {"0", "4", "6"}
    assert w4["layers"]["0"].startswith("int8") and w4["layers"]["6"].startswith("int8")
    assert w4["layers"]["4"].startswith("uint4-asym-channel")
    assert w4["layers"]["4"].endswith("act uint8")
    assert results["rows"][0]["layers"] == {"0": "float32", "4": "float32", "6": "float32"}


def test_demo_writes_the_four_files(demo):
    out, results = demo
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "w2a4" in html
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny | w4a8 |" in (out / "report.md").read_text()


def test_every_row_gets_the_resident_memory_of_its_delivered_form(demo):
    """The number in a row is what resident_memory returned for that row's job, and the
    job rebuilds the form the latency column timed, from the saved artifact."""
    out, results = demo
    rows = {r["recipe"]: r for r in results["rows"]}
    measured = {args[0]: (args, setup_args, y, added) for args, setup_args, y, added in MEASURED}
    assert len(measured) == len(rows) == len(MEASURED)
    float_args, float_setup, y_float, _ = next(m for m in MEASURED if m[0][1] == "float")
    assert float_args[2] == rows["float"]["float_path"] and float_setup[1] is None
    with torch.no_grad():  # the float row's form gives the float model's output (bf16 too)
        want = TinyRef().model(TinyRef().example)
    assert torch.allclose(y_float.float(), want, rtol=0.05, atol=0.05 * want.abs().max())
    for recipe, row in rows.items():
        if recipe == "float":
            assert row["resident_bytes"] == measured[float_args[0]][3]
            continue
        args, setup_args, y, added = measured[str(out / row["artifact"])]
        assert row["resident_bytes"] == added and row["resident_anon_bytes"] == 0
        assert not any("resident memory not measured" in n for n in row["notes"])
        assert setup_args == [float_setup[0], float_args[0]]  # same batch; float = skeleton
        assert y.shape == (8, 4)
        if row["runtime"] == "simulated":
            assert args[1:3] == ["as-is", None]
        else:  # deployed on the backend the row names, no second race
            backend = "onednn" if row["runtime"].startswith("oneDNN") else "onnxruntime"
            assert args[1:3] == ["deploy", backend]
    md = (out / "report.md").read_text()
    assert f"| {rows['w8a8']['resident_bytes'] / 1024:.1f} KiB (0.0 KiB anon.) |" in md
    assert "Resident memory: what the row's delivered form adds" in md
    assert results["environment"]["memory_s"] >= 0


def test_a_failed_memory_measurement_is_a_note_not_a_crash(tmp_path, monkeypatch):
    from compactnn.measure import memory

    def broken(*args, **kwargs):
        raise CompactnnError("resident_memory: the child process building x failed (exit 1)")

    monkeypatch.setattr(memory, "resident_memory", broken)
    suite = [("tiny", "float"), ("tiny", "w8a8")]
    results = run_demo(
        tmp_path / "d", quick=True, threads=1, suite=suite, loader=lambda _n: TinyRef(),
        progress=False,
    )  # fmt: skip
    for row in results["rows"]:
        assert "resident_bytes" not in row
        assert any(
            n.startswith("resident memory not measured: CompactnnError") for n in row["notes"]
        )
    assert "| tiny | w8a8 |" in (tmp_path / "d" / "report.md").read_text()


def test_demo_artifacts_record_their_reference_by_name(demo):
    """So `compactnn eval out/demo/artifacts/<model>/<recipe>` needs no --model."""
    out, _ = demo
    header = json.loads((out / "artifacts" / "tiny" / "w4a8" / "compactnn.json").read_text())
    assert header["extra"]["source"] == {"kind": "reference", "model": "tiny"}


def test_demo_refuses_existing_report_without_force(demo):
    out, _ = demo
    with pytest.raises(CompactnnError, match="--force"):
        run_demo(out, suite=SUITE, loader=lambda _n: TinyRef(), progress=False, memory=False)


def test_training_recipes_are_trained_on_the_reference_data_only(tmp_path):
    from compactnn.demo import is_training_recipe

    assert is_training_recipe("w2a8-ttq") and is_training_recipe("w1a1-reactnet")
    assert not is_training_recipe("w4a8") and not is_training_recipe("w4a4-qdrop")
    with pytest.raises(CompactnnError, match="'tiny' has none"):
        run_demo(
            tmp_path / "demo",
            suite=[("tiny", "w2a8-ttq")],
            loader=lambda _n: TinyRef(),
            progress=False,
            force=True,
        )


def test_rows_run_on_their_delivered_form_against_the_fastest_float_path(demo):
    _out, results = demo
    rows = {r["recipe"]: r for r in results["rows"]}
    paths = results["models"]["tiny"]["float_paths"]
    floats = {k: v["median_s"] for k, v in paths["timings"].items() if k in paths["errors"]}
    assert paths["winner"] == min(floats, key=floats.get)  # the fastest of the same run
    assert rows["float"]["latency"]["median_s"] == floats[paths["winner"]]
    assert rows["w8a8"]["runtime"] in ("oneDNN int8", "ONNX Runtime int8")
    best = rows["float"]["latency"]["median_s"]
    assert rows["w8a8"]["speedup"] == pytest.approx(best / rows["w8a8"]["latency"]["median_s"])
    assert rows["w8a8"]["latency"]["batch"] == 8  # the example's 8 rows
    assert "runs on" in (_out / "report.md").read_text()


class _Constant(nn.Module):
    """A stand-in "deployed" model whose logits always pick class 0."""

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 4).float()


def test_quality_comes_from_the_delivered_model_and_failures_read_simulated(tmp_path, monkeypatch):
    import compactnn

    calls = []

    def fake_deploy(qmodel, backend="auto", *, example=None, **kw):
        calls.append(backend)
        if len(calls) == 2:
            raise CompactnnError("no integer kernel for 2-bit weights yet")
        fake = _Constant()
        fake.backend, fake.kept_float = "onednn", {}
        return fake

    monkeypatch.setattr(compactnn, "deploy", fake_deploy)
    ref = TinyRef()
    results = run_demo(
        tmp_path / "d",
        quick=True,
        threads=1,
        suite=[("tiny", "float"), ("tiny", "w8a8"), ("tiny", "w2a4")],
        loader=lambda _n: ref,
        progress=False,
        memory=False,
    )
    rows = {r["recipe"]: r for r in results["rows"]}
    expected = 100.0 * float((ref.labels == 0).float().mean())  # what class 0 scores
    assert calls == ["auto", "auto"]
    assert rows["w8a8"]["quality"] == pytest.approx(expected) and expected < 100.0
    assert rows["w8a8"]["runtime"] == "oneDNN int8"
    assert rows["w2a4"]["runtime"] == "simulated" and rows["w2a4"]["speedup"] is None
    assert any("no integer kernel for 2-bit" in n for n in rows["w2a4"]["notes"])
    md = (tmp_path / "d" / "report.md").read_text()
    assert "| tiny | w2a4 | simulated |" in md


def test_a_row_is_delivered_as_compactnn_eval_delivers_it(monkeypatch):
    import compactnn
    from compactnn import demo as demo_module

    ref = TinyRef()
    with pytest.warns(UserWarning, match="channel pruning skipped"):  # the output layer
        pruned = compactnn.compress(ref.model, "ch50", calib_data=ref.calib, progress=False)
    w8a8 = compactnn.compress(ref.model, "w8a8", calib_data=ref.calib, progress=False)
    calls = []
    monkeypatch.setattr(
        demo_module, "deliver_float", lambda m, b, **kw: calls.append(("float", m, kw))
    )
    monkeypatch.setattr(demo_module, "deliver", lambda k, m, b: calls.append((k, m, {})))
    demo_module.deliver_row("cnn", pruned, ref.example, quick=True, threads=1)
    demo_module.deliver_row("cnn", w8a8, ref.example, quick=True, threads=1)
    assert [(c[0], c[1]) for c in calls] == [("float", pruned), ("cnn", w8a8)]
    assert calls[0][2] == {"quick": True, "threads": 1}


def _pruned_demo_rows(tmp_path, recipe: str) -> dict:
    """The quick demo of the tiny reference with a float row and a channel-pruning row."""
    ref = TinyRef()
    with pytest.warns(UserWarning, match="channel pruning skipped"):  # the output layer
        results = run_demo(
            tmp_path / "d",
            quick=True,
            threads=1,
            suite=[("tiny", "float"), ("tiny", recipe)],
            loader=lambda _n: ref,
            progress=False,
            memory=False,
        )
    return {r["recipe"]: r for r in results["rows"]}


def test_a_channel_pruned_row_runs_natively_not_simulated(tmp_path):
    rows = _pruned_demo_rows(tmp_path, "ch50")
    row = rows["ch50"]
    assert row["runtime"] in ("PyTorch fp32", "PyTorch bf16 autocast", "ONNX Runtime fp32")
    assert row["speedup"] == pytest.approx(
        rows["float"]["latency"]["median_s"] / row["latency"]["median_s"]
    )
    assert any("runs natively: a plain float model" in n for n in row["notes"])
    md = (tmp_path / "d" / "report.md").read_text()
    assert "| tiny | ch50 | simulated |" not in md
    assert "Resident memory: not measured (`--no-memory`)." in md  # run with memory=False


def test_the_suite_has_a_fine_tuned_channel_pruning_row(tmp_path):
    """``ch50-ft`` (the short name: what a user types gets what the demo ran): the pruned
    model is measured on its own float path with a speedup, and its artifact's recipe
    reloads as it ran."""
    from compactnn.demo_suite import SUITE, suite_recipe
    from compactnn.recipe import Recipe, resolve_recipe

    assert ("mnist-cnn", "ch50-ft") in SUITE and suite_recipe("ch50-ft") == "ch50-ft"
    step = resolve_recipe("ch50-ft").steps[0]
    assert step.method == "channel" and step.config.ratio == 0.5
    assert step.config.finetune_steps == 1000 and suite_recipe("w4a8") == "w4a8"
    rows = _pruned_demo_rows(tmp_path, "ch50-ft")
    row = rows["ch50-ft"]
    assert row["runtime"] in ("PyTorch fp32", "PyTorch bf16 autocast", "ONNX Runtime fp32")
    assert row["speedup"] > 0 and row["bit_exact_load"] is True
    assert row["size_bytes"] < 0.6 * rows["float"]["size_bytes"]  # half the channels gone
    assert row["quality"] > 50.0  # fine-tuned: far above chance (25% on 4 classes)
    saved = tmp_path / "d" / row["artifact"] / "recipe.yaml"
    assert Recipe.from_yaml(saved.read_text()) == resolve_recipe("ch50-ft")
    assert "| tiny | ch50-ft |" in (tmp_path / "d" / "report.md").read_text()


def test_add_ratios_notes_a_deployed_row_slower_than_float():
    from compactnn.demo import add_ratios

    def row(recipe, ms, runtime):
        return {"model": "m", "recipe": recipe, "size_bytes": 100, "theoretical_bytes": 100,
                "quality": 1.0, "runtime": runtime, "latency": {"median_s": ms / 1e3},
                "notes": []}  # fmt: skip

    rows = [row("float", 2.0, "PyTorch fp32"), row("w8a8", 5.0, "oneDNN int8"),
            row("w4", 1.0, "oneDNN int8"), row("w2", 9.0, "simulated")]  # fmt: skip
    add_ratios(rows)
    assert rows[1]["speedup"] == pytest.approx(0.4)
    assert rows[1]["notes"] == [
        "slower than the fastest float path (5.00 ms vs 2.00 ms): the float model is the "
        "faster way to run this"
    ]
    assert rows[0]["notes"] == rows[2]["notes"] == rows[3]["notes"] == []
