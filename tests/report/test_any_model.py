"""build_report and `compactnn report`: numbers checked against hand computations."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compactnn
from compactnn.cli import main
from compactnn.data import load_digits8
from compactnn.errors import CompactnnError
from compactnn.measure.float_paths import fastest_float_path
from compactnn.report import build_report, labelled_data
from compactnn.report.any_model import REPORT_FILES, check_report_folder
from compactnn.report.delivery import deliver_float

NET_SOURCE = """
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(256, 10),
    )
"""


def _build() -> nn.Module:
    namespace: dict = {}
    exec(NET_SOURCE, namespace)
    return namespace["build"]()


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x, y = load_digits8().x_train[:512], load_digits8().y_train[:512]
    net = _build()
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(15):  # full-batch steps: ~85% top-1, enough to tell recipes apart
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.state_dict()


def _trained(shift: float = 0.0) -> nn.Module:
    """The trained net; ``shift`` != 0 gives another float model of the same architecture."""
    net = _build()
    net.load_state_dict({k: v + shift for k, v in _trained_state().items()})
    return net.eval()


def _hand_top1(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * int((model(x).argmax(1) == y).sum()) / len(y)


def _dir_bytes(path: Path) -> int:
    return sum(os.stat(p).st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("any_model")
    net = _trained()
    calib = load_digits8().x_train[:64]
    paths = {}
    for recipe in ("w8a8", "sp50"):
        qmodel = compactnn.compress(net, recipe, calib_data=calib, progress=False)
        paths[recipe] = root / recipe
        compactnn.save(qmodel, paths[recipe])
    return root, net, paths


def test_rows_match_hand_computed_numbers(setup):
    root, net, paths = setup
    split = load_digits8()
    x, y = split.x_test, split.y_test
    results = build_report(
        [paths["w8a8"], paths["sp50"]], model=net, data=split, out=root / "r", runs=2,
        progress=False, quick=True,
    )  # fmt: skip
    rows = {r["label"]: r for r in results["rows"]}
    assert list(rows) == ["float", "w8a8", "w8a8 int8", "sp50"]
    backends = {"oneDNN int8": "onednn", "ONNX Runtime int8": "onnxruntime"}
    float_names = ("PyTorch fp32", "PyTorch bf16 autocast", "ONNX Runtime fp32")
    runtime = rows["w8a8 int8"]["runs_as"]
    assert rows["float"]["runs_as"] in float_names and runtime in backends
    assert rows["w8a8"]["runs_as"] == "simulated"
    # sp50 loads as a plain float model (zeros in dense weights): delivered as itself
    assert rows["sp50"]["runs_as"] in float_names
    paths_ = results["float_paths"]
    assert rows["float"]["latency"] == paths_["timings"][paths_["winner"]]  # the fastest
    assert rows["w8a8"]["speedup"] is None  # a simulated model claims no speedup
    ratio = rows["float"]["latency"]["median_s"] / rows["w8a8 int8"]["latency"]["median_s"]
    assert rows["w8a8 int8"]["speedup"] == pytest.approx(ratio)
    assert rows["float"]["quality"] == pytest.approx(_hand_top1(net, x, y), abs=1e-9)
    for recipe, path in paths.items():
        loaded = compactnn.load(path, model=_build())
        assert rows[recipe]["quality"] == pytest.approx(_hand_top1(loaded, x, y), abs=1e-9)
        assert rows[recipe]["size_bytes"] == _dir_bytes(path)
    deployed = compactnn.deploy(
        compactnn.load(paths["w8a8"], model=net), backend=backends[runtime], example=x[:16]
    )
    assert rows["w8a8 int8"]["quality"] == pytest.approx(_hand_top1(deployed, x, y), abs=1e-9)
    assert rows["sp50"]["size_bytes"] < rows["float"]["size_bytes"]
    assert rows["w8a8"]["size_ratio"] == pytest.approx(
        rows["float"]["size_bytes"] / rows["w8a8"]["size_bytes"]
    )
    assert rows["w8a8"]["quality_delta"] == pytest.approx(
        rows["w8a8"]["quality"] - rows["float"]["quality"]
    )
    assert any("runs natively" in n for n in rows["sp50"]["notes"])
    assert not any("barely above" in n for n in rows["float"]["notes"])
    # sp50 keeps the float model's weight shapes: its dense compute is no speedup, noise at most
    assert rows["sp50"]["speedup"] is None and rows["sp50"]["no_speedup"] == "none (dense)"
    assert any(n.startswith("no speedup claimed: the compressed") for n in rows["sp50"]["notes"])
    assert json.loads((root / "r" / "results.json").read_text())["rows"][1]["label"] == "w8a8"
    md = (root / "r" / "report.md").read_text()
    assert f"| w8a8 int8 | {runtime} | {rows['w8a8 int8']['quality']:.2f}%" in md
    sim_lines = [line for line in md.splitlines() if line.startswith("| w8a8 | simulated |")]
    # no speedup claimed; resident memory "-": not measured (build_report's memory=False)
    assert len(sim_lines) == 1 and sim_lines[0].endswith("| simulated | - |")
    sp_lines = [line for line in md.splitlines() if line.startswith("| sp50 |")]
    assert len(sp_lines) == 1 and "| none (dense) |" in sp_lines[0]
    assert "Resident memory: not measured (`--no-memory`, or `memory=False`" in md
    assert (root / "r" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (root / "r" / "report.html").read_text()


def test_data_the_float_model_cannot_read_is_flagged(setup):
    """Labels shifted by one class: the float model scores below always guessing the most
    frequent label, which the report says (warning and the float row's notes)."""
    root, net, paths = setup
    x, y = load_digits8().x_test[:200], load_digits8().y_test[:200]
    shifted = (y + 1) % 10
    assert _hand_top1(net, x, shifted) <= 100.0 * int(torch.bincount(shifted).max()) / len(y)
    with pytest.warns(UserWarning, match="barely above always answering"):
        results = build_report(
            [paths["w8a8"]], model=net, data=(x, shifted), out=root / "shifted", runs=2,
            progress=False, quick=True,
        )  # fmt: skip
    assert any("preprocessed" in n for n in results["rows"][0]["notes"])


def test_custom_metric_and_data_forms(setup):
    root, net, paths = setup
    x, y = load_digits8().x_test[:50], load_digits8().y_test[:50]

    def errors(outputs, labels):  # misclassified samples per 50 (a batch mean, x 50)
        return 50.0 * float((outputs.argmax(1) != labels).float().mean())

    results = build_report(
        [paths["sp50"]], model=net, data={"x": x, "y": y}, metric=errors, out=root / "m",
        runs=1, progress=False, quick=True,
    )  # fmt: skip
    expected = 50 - _hand_top1(net, x, y) / 2  # 50 samples: each is 2 percent points
    assert results["rows"][0]["quality"] == pytest.approx(expected)
    assert results["metric"] == "errors"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (torch.zeros(4, 1, 8, 8), "no labels"),
        ({"x": torch.zeros(4, 1, 8, 8)}, "no labels"),
        ((torch.zeros(4, 1, 8, 8), torch.zeros(3)), "4 inputs but 3 labels"),
    ],
)
def test_labelled_data_refuses(data, needle):
    with pytest.raises(CompactnnError, match=needle):
        labelled_data(data)


def test_refuses_bad_out_metric_and_paths(setup, tmp_path):
    _root, net, paths = setup
    data = load_digits8()
    (tmp_path / "file").write_text("x")
    kw = {"model": net, "data": data, "progress": False}
    with pytest.raises(CompactnnError, match="is a file"):
        build_report([paths["sp50"]], out=tmp_path / "file" / "r", **kw)
    with pytest.raises(CompactnnError, match="metric='top5' is unknown"):
        build_report([paths["sp50"]], out=tmp_path / "r", metric="top5", **kw)
    with pytest.raises(CompactnnError, match="not a compactnn artifact"):
        build_report([tmp_path], out=tmp_path / "r", **kw)
    with pytest.raises(CompactnnError, match="no artifact given"):
        build_report([], out=tmp_path / "r", **kw)


@pytest.fixture()
def cli_project(tmp_path, monkeypatch):
    """A user's project: a factory module, two sets of weights, labelled data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jnet_report.py").write_text(NET_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    split = load_digits8()
    for seed in (0, 1):
        save_file(_trained(0.01 * seed).state_dict(), str(tmp_path / f"w{seed}.safetensors"))
    save_file({"x": split.x_test, "y": split.y_test}, str(tmp_path / "test.safetensors"))
    save_file({"x": split.x_test}, str(tmp_path / "nolabels.safetensors"))
    save_file({"x": split.x_test[:8, :, :4].contiguous()}, str(tmp_path / "cropped.safetensors"))
    save_file({"x": split.x_train[:64]}, str(tmp_path / "calib.safetensors"))
    for seed, recipe in ((0, "w8a8"), (0, "sp50"), (1, "w8a8")):
        args = ["compress", "jnet_report:build", "--weights", f"w{seed}.safetensors"]
        args += ["--recipe", recipe, "--data", "calib.safetensors", "--out", f"a{seed}-{recipe}"]
        assert main([*args, "--no-progress"]) == 0
    yield tmp_path
    sys.modules.pop("jnet_report", None)


def test_cli_report_and_its_errors(cli_project, capsys):
    model = ["--model", "jnet_report:build", "--weights", "w0.safetensors", "--no-progress",
             "--no-memory"]  # fmt: skip
    status = main(["report", "a0-w8a8", "a0-sp50", *model, "--runs", "2", "--quick",
                   "--data", "test.safetensors", "--out", "rep"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    results = json.loads((cli_project / "rep" / "results.json").read_text())
    assert [r["label"] for r in results["rows"]] == ["float", "w8a8", "w8a8 int8", "sp50"]
    runtime = results["rows"][2]["runs_as"]
    assert f"{results['rows'][1]['quality']:.2f}%" in out and runtime in out
    assert runtime in ("oneDNN int8", "ONNX Runtime int8")
    cases = [
        (["a0-w8a8", "a1-w8a8", "--data", "test.safetensors"], "different float models"),
        (["a0-w8a8", "--data", "cropped.safetensors"], "--data does not fit the model"),
        (["a0-w8a8", "--data", "calib.pt"], "must be a .safetensors file"),
    ]
    for args, needle in cases:
        assert main(["report", *args, *model, "--out", "rep2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    other = ["--model", "jnet_report:build", "--weights", "w1.safetensors", "--no-progress"]
    assert main(["report", "a0-w8a8", *other, "--data", "test.safetensors", "--out", "rep3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # its float row would be another model
    assert len(err) == 1 and "is not the file this artifact was made from" in err[0], err
    assert "pass the --weights (MODEL) they were made from" in err[0]
    assert not (cli_project / "rep3").exists()
    (cli_project / "taken").write_text("")
    assert main(["report", "a0-w8a8", *model, "--data", "test.safetensors",
                 "--out", "taken/sub"]) == 2  # fmt: skip
    assert "is a file" in capsys.readouterr().err
    # the user's own report.md / results.json are kept unless --force
    mine = cli_project / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes\n")
    (mine / "results.json").write_text('{"mine": 1}')
    hf = cli_project / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_text("")
    refusals = [
        (["--out", "mine"], "already holds a report (report.md, results.json); pass --force"),
        (["--out", "a0-sp50", "--force"], "holds a compactnn artifact"),
        (["--out", "hf-model", "--force"], "holds other files (config.json, model.safetensors)"),
    ]
    for args, needle in refusals:
        before = {p: p.read_bytes() for p in cli_project.rglob("*") if p.is_file()}
        run = ["report", "a0-w8a8", *model, "--data", "test.safetensors", *args]
        assert main(run) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert {p: p.read_bytes() for p in cli_project.rglob("*") if p.is_file()} == before
    assert main(["report", "a0-sp50", *model, "--runs", "1", "--quick",
                 "--data", "test.safetensors", "--out", "mine", "--force"]) == 0  # fmt: skip
    capsys.readouterr()
    assert json.loads((mine / "results.json").read_text())["rows"][1]["label"] == "sp50"
    assert sorted(p.name for p in mine.iterdir()) == sorted(REPORT_FILES)


def test_report_folder_guard(setup, tmp_path):
    _root, _net, paths = setup
    assert check_report_folder(tmp_path / "new" / "r") == tmp_path / "new" / "r"
    assert check_report_folder(tmp_path) == tmp_path  # empty
    (tmp_path / ".report.md.x1y2.tmp").write_text("")  # a killed write's leftover: ignored
    (tmp_path / "pareto.png").write_bytes(b"")
    with pytest.raises(CompactnnError, match=r"already holds a report \(pareto.png\); pass force"):
        check_report_folder(tmp_path)
    assert check_report_folder(tmp_path, force=True) == tmp_path
    with pytest.raises(CompactnnError, match="holds a compactnn artifact"):
        check_report_folder(paths["sp50"], force=True)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(CompactnnError, match=r"other files \(notes.txt\).*only replaces"):
        check_report_folder(tmp_path, force=True)


@pytest.mark.parametrize("quick", [False, True])
def test_a_pruned_row_races_the_float_paths_the_float_row_does(setup, monkeypatch, quick):
    """A plain float artifact (sp50) is delivered on its own fastest float path: without
    --quick, torch.compile is in its race as in the float row's (it said "not tried in
    quick mode"). The races are spied on and run quick, to keep the test fast."""
    from compactnn.report import any_model

    root, net, paths = setup
    asked = {}

    def race(model, example, **kw):
        asked["float"] = kw["quick"]
        return fastest_float_path(model, example, **{**kw, "quick": True})

    def deliver(model, example, **kw):
        asked["sp50"] = kw.get("quick")  # None: left to its default
        return deliver_float(model, example, **{**kw, "quick": True})

    monkeypatch.setattr(any_model, "fastest_float_path", race)
    monkeypatch.setattr(any_model, "deliver_float", deliver)
    build_report(
        [paths["sp50"]], model=net, data=load_digits8(), out=root / f"q{quick}", runs=1,
        progress=False, quick=quick,
    )  # fmt: skip
    assert asked == {"float": quick, "sp50": quick}


def test_inflated_timings_are_marked_and_left_off_the_latency_front(setup, monkeypatch):
    """Timings the run judged inflated (here: every one) are marked in the table (latency,
    and each speedup computed from one), footnoted, named in results.json, and kept off the
    latency front; the size front does not depend on timings."""
    from compactnn.measure import timing
    from compactnn.report.any_model_table import HEADER, table_rows
    from compactnn.report.writer import SUSPECT_FOOTNOTE

    root, net, paths = setup
    monkeypatch.setattr(timing, "suspect_reasons", lambda t: ["runs spread 90% (busy)"])
    results = build_report(
        [paths["w8a8"]], model=net, data=load_digits8(), out=root / "r_suspect", runs=2,
        progress=False, quick=True,
    )  # fmt: skip
    labels = [r["label"] for r in results["rows"]]
    assert results["latency_suspect"] == labels == ["float", "w8a8", "w8a8 int8"]
    assert results["pareto_front"]["latency"] == []
    assert results["pareto_front"]["size"]  # unchanged by timings
    lat, speed = HEADER.index("latency"), HEADER.index("speedup vs fastest float")
    cells = {r[0]: r for r in table_rows(results)}
    assert all(c[lat].endswith(" *") and " ms" in c[lat] for c in cells.values())
    assert cells["w8a8"][speed] == "simulated"  # no speedup claimed, none marked
    assert cells["w8a8 int8"][speed].endswith("x *") and cells["float"][speed] == "1.00x *"
    md = (root / "r_suspect" / "report.md").read_text()
    assert SUSPECT_FOOTNOTE in md and "- w8a8 int8: runs spread 90% (busy)" in md


def test_a_training_recipe_never_trained_is_labelled_so(setup):
    """compress calibrates a training recipe without training it: its row says so; the
    same recipe out of the training wrapper (freeze: trained) has the plain name."""
    from compactnn.training import freeze, prepare_qat

    root, net, _ = setup
    calib = load_digits8().x_train[:64]
    calibrated = compactnn.compress(net, "w4a4-lsq", calib_data=calib, progress=False)
    compactnn.save(calibrated, root / "lsq_calibrated")
    compactnn.save(freeze(prepare_qat(net, "w4a4-lsq", calib, progress=False)), root / "lsq_tr")
    results = build_report(
        [root / "lsq_calibrated", root / "lsq_tr"], model=net, data=load_digits8(),
        out=root / "r_untrained", runs=2, progress=False, quick=True,
    )  # fmt: skip
    rows = {r["label"]: r for r in results["rows"]}
    untrained = "w4a4-lsq (calibrated only, not trained)"
    assert untrained in rows and "w4a4-lsq" in rows
    assert rows[untrained]["artifact"].endswith("lsq_calibrated")
    assert any("compactnn train" in n for n in rows[untrained]["notes"])
    assert rows["w4a4-lsq"]["artifact"].endswith("lsq_tr")
    assert untrained in (root / "r_untrained" / "report.md").read_text()


def test_cli_report_takes_a_reference_name_as_data(cli_project, capsys):
    """`--data digits-resnet` (a reference model's name, as docs/cli.md allows --data to be)
    scores on that reference's held-out test split: the same numbers as the file of it."""
    model = ["--model", "jnet_report:build", "--weights", "w0.safetensors", "--no-progress",
             "--no-memory", "--runs", "1", "--quick"]  # fmt: skip
    quality = {}
    for data in ("test.safetensors", "digits-resnet"):
        assert main(["report", "a0-w8a8", *model, "--data", data, "--out", f"r-{data}"]) == 0
        results = json.loads((cli_project / f"r-{data}" / "results.json").read_text())
        quality[data] = [(r["label"], r["metric"], r["quality"]) for r in results["rows"]]
        assert results["samples"] == len(load_digits8().y_test)
    assert quality["digits-resnet"] == quality["test.safetensors"]
    capsys.readouterr()
    assert main(["report", "a0-w8a8", *model, "--data", "nope", "--out", "r-nope"]) == 2
    err = capsys.readouterr().err
    assert "--data 'nope' must be" in err and "mnist-cnn" in err and "digits" in err


def test_a_failed_write_leaves_no_folder_it_created(setup, tmp_path, monkeypatch):
    """``build_report`` (and so ``compactnn report``) removes the new ``out`` folder when
    writing the files fails, e.g. on a full disk; a folder that existed stays."""
    from compactnn.report import any_model

    _root, net, paths = setup

    def full_disk(out, *args):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(any_model, "write_files", full_disk)
    kw = {"model": net, "data": load_digits8(), "progress": False, "runs": 1, "memory": False}
    with pytest.raises(OSError, match="No space"):
        build_report([paths["sp50"]], out=tmp_path / "new" / "r", **kw)
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(OSError, match="No space"):
        build_report([paths["sp50"]], out=tmp_path / "old" / "r", **kw)
    assert (tmp_path / "old").is_dir() and not (tmp_path / "old" / "r").exists()
