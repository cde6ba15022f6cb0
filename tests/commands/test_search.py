"""``compactnn search`` on a factory model with its own calibration data."""

import argparse
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import compactnn
from compactnn.cli import main
from compactnn.commands import search as search_command
from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
"""


def parse(argv):
    parser = argparse.ArgumentParser()
    search_command.add_parser(parser.add_subparsers())
    return parser.parse_args(["search", *argv])


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "searchnet.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import searchnet

    model = searchnet.make()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors"
    )
    save_file({"x": torch.randn(64, 1, 8, 8)}, tmp_path / "calib.safetensors")
    return tmp_path, model


def test_writes_a_recipe_compress_runs(project, capsys):
    tmp, model = project
    out = tmp / "search"
    args = parse(
        [
            "searchnet:make",
            "--weights",
            str(tmp / "w.safetensors"),
            "--data",
            str(tmp / "calib.safetensors"),
            "--formats",
            "w2a8,w4a8,w8a8",
            "--avg-bits",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert search_command.run(args) == 0
    summary = json.loads((out / "search.json").read_text())
    assert set(summary["assignment"]) == {"0", "3"}
    printed = capsys.readouterr().out
    assert "wrote" in printed
    weights, calib = tmp / "w.safetensors", tmp / "calib.safetensors"
    assert f"--weights {weights} --data {calib}" in printed  # a compress line that works
    recipe = Recipe.from_yaml((out / "recipe.yaml").read_text())
    q = compactnn.compress(model, recipe, calib_data=torch.randn(16, 1, 8, 8), progress=False)
    for name, fmt in summary["assignment"].items():
        assert q.get_submodule(name).weight_spec.bits == int(fmt[1])
    bits = 4 * 9 * int(summary["assignment"]["0"][1]) + 256 * 3 * int(summary["assignment"]["3"][1])
    assert bits <= 4 * (36 + 768)
    avg = bits / (36 + 768)
    assert f"average bits per weight: {avg:.3g} (over 804 weights; budget 4)" in printed
    assert summary["cost"]["avg_bits"] == pytest.approx(bits / (36 + 768))


def test_needs_a_budget(project):
    tmp, _ = project
    args = parse(
        [
            "searchnet:make",
            "--weights",
            str(tmp / "w.safetensors"),
            "--formats",
            "w2a8,w8a8",
            "--out",
            str(tmp / "o"),
        ]
    )
    with pytest.raises(CompactnnError, match="needs a budget"):
        search_command.run(args)


def test_groups_flag_reaches_the_search(project):
    tmp, _ = project
    argv = ["searchnet:make", "--weights", str(tmp / "w.safetensors"), "--data",
            str(tmp / "calib.safetensors"), "--formats", "w2a8,w8a8", "--avg-bits", "4",
            "--out", str(tmp / "g"), "--no-progress"]  # fmt: skip
    assert parse(argv).groups is None and parse([*argv, "--no-groups"]).groups is False
    with pytest.raises(CompactnnError, match=r"groups=True needs ch<P>\+ formats"):
        search_command.run(parse([*argv, "--groups"]))


def search_argv(tmp, out, *more):
    return ["searchnet:make", "--weights", str(tmp / "w.safetensors"), "--data",
            str(tmp / "calib.safetensors"), "--formats", "w2a8,w8a8", "--out", str(out),
            "--no-progress", *more]  # fmt: skip


def test_out_holding_an_artifact_or_other_files_is_refused_before_searching(project):
    tmp, model = project
    art = tmp / "art"
    q = compactnn.compress(model, "w8", progress=False)
    compactnn.save(q, art)
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    for force in ([], ["--force"]):
        with pytest.raises(CompactnnError, match="holds a compactnn artifact"):
            search_command.run(parse(search_argv(tmp, art, "--avg-bits", "4", *force)))
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    compactnn.load(art, model=model)  # still intact
    other = tmp / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CompactnnError, match="not empty"):
        search_command.run(parse(search_argv(tmp, other, "--avg-bits", "4", "--force")))


def test_an_earlier_search_needs_force_and_a_failed_search_writes_nothing(project):
    tmp, _ = project
    out = tmp / "s"
    with pytest.raises(CompactnnError):  # no assignment fits 1 bit on average
        search_command.run(parse(search_argv(tmp, out, "--avg-bits", "1")))
    assert not out.exists() or not any(out.iterdir())
    assert search_command.run(parse(search_argv(tmp, out, "--avg-bits", "4"))) == 0
    assert {p.name for p in out.iterdir()} == {"recipe.yaml", "search.json", "sensitivity.json"}
    with pytest.raises(CompactnnError, match=r"earlier search.*--force"):
        search_command.run(parse(search_argv(tmp, out, "--avg-bits", "8")))
    first = (out / "search.json").read_text()
    with pytest.raises(CompactnnError):
        search_command.run(parse(search_argv(tmp, out, "--avg-bits", "1", "--force")))
    assert (out / "search.json").read_text() == first
    assert search_command.run(parse(search_argv(tmp, out, "--avg-bits", "8", "--force"))) == 0


def cli(capsys, *argv):
    code = main(["search", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def own_model(tmp, data="calib.safetensors"):
    data = () if data is None else ("--data", tmp / data)
    return ["searchnet:make", "--weights", tmp / "w.safetensors", *data, "--no-progress"]


def test_no_data_asks_for_the_data_flag_before_loading(project, capsys):
    tmp, _ = project
    argv = [*own_model(tmp, None), "-f", "w2a8,w8a8", "--avg-bits", "3", "-o", tmp / "s"]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "pass --data FILE" in err and "calib_data" not in err, err


def test_latency_budget_times_the_first_data_batch(project, capsys, monkeypatch):
    tmp, _ = project
    seen = {}

    def fake_search(model, **kwargs):
        seen.update(kwargs)
        raise CompactnnError("stopped here")

    monkeypatch.setattr(search_command, "search", fake_search)
    argv = [*own_model(tmp), "-f", "ch50+w8a8,w8a8", "--max-latency-ratio", "0.8", "-o", tmp / "s"]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "stopped here" in err, err
    x = load_file(tmp / "calib.safetensors")["x"]
    assert torch.equal(seen["latency_example"], x[:32])
    code, _, err = cli(
        capsys, *own_model(tmp), "-f", "w2a8,w8a8", "--avg-bits", "3", "-o", tmp / "t"
    )
    assert seen["latency_example"] is None  # only a latency budget times anything


def test_max_drop_scores_top1_on_labelled_data(project, capsys):
    tmp, model = project
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # the float model is right on every sample: 100% top-1
    save_file({"x": x, "y": y}, tmp / "xy.safetensors")
    argv = [*own_model(tmp, "xy.safetensors"), "-f", "w2a8,w8a8", "--max-drop", "5", "--max-evals",
            "3", "-o", tmp / "acc"]  # fmt: skip
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "top-1 (%) on x/y of --data" in out and "calibration samples" in err
    summary = json.loads((tmp / "acc" / "search.json").read_text())
    assert summary["baseline"] == 100.0 and summary["tried"]
    best = [t for t in summary["tried"] if t["passed"]]
    assert best and all(t["drop"] <= 5 for t in best)
    argv = [*own_model(tmp), "-f", "w2a8,w8a8", "--max-drop", "5", "-o", tmp / "acc2"]
    code, _, err = cli(capsys, *argv)  # inputs only: nothing to score
    assert code == 2 and "pass labelled --data FILE" in err and "eval_fn" not in err, err


def test_an_unreachable_average_is_reported_in_bits_per_weight(project, capsys):
    tmp, _ = project
    argv = [*own_model(tmp), "-f", "w2a8,w8a8", "--avg-bits", "1.5", "-o", tmp / "s"]
    code, _, err = cli(capsys, *argv)
    assert code == 2, err
    assert "1.50 bits/weight is below the smallest reachable 2.00" in err and "code_bits" not in err


def test_a_file_with_both_splits_calibrates_on_train_and_scores_on_test(
    project, capsys, monkeypatch
):
    tmp, _ = project
    g = torch.Generator().manual_seed(3)
    split = {
        "x_train": torch.randn(40, 1, 8, 8, generator=g),
        "y_train": torch.randint(0, 3, (40,), generator=g),
        "x_test": torch.randn(24, 1, 8, 8, generator=g),
        "y_test": torch.randint(0, 3, (24,), generator=g),
    }
    save_file(split, tmp / "split.safetensors")
    seen = {}

    def fake_search(model, **kwargs):
        seen.update(kwargs)
        raise CompactnnError("stopped here")

    monkeypatch.setattr(search_command, "evaluation", lambda args, loaded, data, keys: (data, {}))
    monkeypatch.setattr(search_command, "search", fake_search)
    argv = [*own_model(tmp, "split.safetensors"), "-f", "w2a8,w8a8", "--max-drop", "5",
            "-o", tmp / "s"]  # fmt: skip
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "stopped here" in err, err
    assert torch.equal(seen["calib_data"], split["x_train"])  # never calibrate on test data
    x, y = seen["eval_fn"]
    assert torch.equal(x, split["x_test"]) and torch.equal(y, split["y_test"])


def top1(model, x, y):
    """Top-1 (%) computed by hand: the reference the search's quality is checked against."""
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def test_max_drop_on_a_split_file_is_measured_held_out_and_recorded(project, capsys):
    tmp, model = project
    g = torch.Generator().manual_seed(5)
    x_train, x_test = torch.randn(40, 1, 8, 8, generator=g), torch.randn(30, 1, 8, 8, generator=g)
    with torch.no_grad():  # labels the float model gets partly wrong: a baseline below 100
        y_test = model(x_test).argmax(1)
    y_test[::3] = (y_test[::3] + 1) % 3
    split = {"x_train": x_train, "y_train": torch.zeros(40, dtype=torch.long),
             "x_test": x_test, "y_test": y_test}  # fmt: skip
    save_file(split, tmp / "split.safetensors")
    argv = [*own_model(tmp, "split.safetensors"), "-f", "w2a8,w8a8", "--max-drop", "5",
            "--max-evals", "3", "-o", tmp / "held"]  # fmt: skip
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "top-1 (%) on x_test/y_test of --data" in out and "(x, y)" not in out
    assert "warning" not in err  # a held-out split: nothing to warn about
    summary = json.loads((tmp / "held" / "search.json").read_text())
    budget = summary["budget"]
    assert budget["max_drop"] == 5 and budget["max_evals"] == 3 and budget["in_sample"] is False
    assert "x_test/y_test" in budget["measured_on"]
    assert budget["baseline"] == pytest.approx(top1(model, x_test, y_test))
    recipe = Recipe.from_yaml((tmp / "held" / "recipe.yaml").read_text())
    q = compactnn.compress(model, recipe, calib_data=x_train, progress=False)
    assert budget["quality"] == pytest.approx(top1(q, x_test, y_test))
    assert budget["drop"] == pytest.approx(budget["baseline"] - budget["quality"]) and (
        budget["drop"] <= 5
    )


def test_max_drop_on_one_labelled_pair_warns_it_is_in_sample(project, capsys):
    tmp, model = project
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = model(x).argmax(1)
    for keys in (("x", "y"), ("x_train", "y_train"), ("x_test", "y_test")):  # one split: same
        save_file(dict(zip(keys, (x, y), strict=True)), tmp / "one.safetensors")
        out_dir = tmp / keys[0]
        argv = [*own_model(tmp, "one.safetensors"), "-f", "w2a8,w8a8", "--max-drop", "5",
                "--max-evals", "2", "-o", out_dir]  # fmt: skip
        code, out, err = cli(capsys, *argv)
        assert code == 0, err
        warning = [line for line in err.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and "calibration samples" in warning[0], err
        assert "x_train/y_train" in warning[0] and "x_test/y_test" in warning[0]
        assert f"top-1 (%) on {keys[0]}/{keys[1]} of --data" in out
        budget = json.loads((out_dir / "search.json").read_text())["budget"]
        assert budget["in_sample"] is True and budget["baseline"] == pytest.approx(
            top1(model, x, y)
        )


def test_search_json_records_the_budget_given(project):
    tmp, _ = project
    out = tmp / "b"
    assert (
        search_command.run(parse(search_argv(tmp, out, "--avg-bits", "4", "--max-bytes", "900")))
        == 0
    )
    summary = json.loads((out / "search.json").read_text())
    artifact = summary["budget"].pop("artifact_bytes")  # measured with --max-bytes
    assert summary["budget"] == {"avg_bits": 4.0, "max_bytes": 900.0}
    assert summary["cost"]["avg_bits"] <= 4 and summary["cost"]["bytes"] <= 900
    assert artifact > summary["cost"]["bytes"]


def test_max_bytes_prints_the_artifact_size_it_does_not_bound(project, capsys):
    """--max-bytes bounds the searched layers' payload; the printout says so and gives the
    artifact's size, equal to the bytes on disk of what compress writes with the recipe."""
    import os

    tmp, _ = project
    out = tmp / "s"
    assert search_command.run(parse(search_argv(tmp, out, "--max-bytes", "900"))) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "search.json").read_text())
    art = tmp / "art-searched"
    assert main(["compress", "searchnet:make", "--weights", str(tmp / "w.safetensors"),
                 "--recipe", str(out / "recipe.yaml"), "--data", str(tmp / "calib.safetensors"),
                 "--out", str(art), "--no-progress"]) == 0  # fmt: skip
    on_disk = sum(os.stat(p).st_size for p in art.rglob("*") if p.is_file())
    payload = summary["cost"]["bytes"]
    assert summary["budget"]["artifact_bytes"] == on_disk > 900 >= payload
    assert f"({payload:,.0f} B; what --max-bytes 900 bounds: the packed weight codes" in printed
    assert "artifact on disk: " in printed and f"({on_disk:,} B, measured" in printed
    assert f"the artifact is {on_disk - 900:,} B over --max-bytes 900" in printed
    sub = search_command.add_parser(argparse.ArgumentParser().add_subparsers())
    assert "weights at most (packed codes, scales, biases): not the artifact" in " ".join(
        sub.format_help().split()
    )


def test_data_free_is_refused_before_loading_with_what_to_pass(project, capsys, monkeypatch):
    tmp, _ = project

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr(search_command, "load_model", no_load)
    for model in (own_model(tmp, None), ["mnist-cnn", "--no-progress"]):
        argv = [*model, "--data", "data-free", "-f", "w2a8,w8a8", "--avg-bits", "4",
                "-o", tmp / "df"]  # fmt: skip
        code, _, err = cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--data data-free" in err and "compactnn compress" in err
        assert "--data FILE" in err and "unknown data" not in err


def fake_timing(monkeypatch, ratios):
    """Deploy-and-time steps replaced: per-layer table w4a8 0.6x w8a8 (6 vs 10 ms), whole-model
    checks measuring ``ratios`` in turn (the CPU ratio 0.1 lower: the wall ratio counts)."""
    from compactnn.mixed_precision import api

    table = np.array([[2.4, 4.0], [3.6, 6.0]])
    calls = []

    def check(model, recipe, calib, example, proxy_ms, reference):
        r = ratios[len(calls)]
        calls.append(proxy_ms)
        return {"reference": reference[0], "reference_ms": 10.0, "measured_ms": 10.0 * r,
                "proxy_ms": proxy_ms, "proxy_error": proxy_ms / (10.0 * r) - 1,
                "measured_ratio": r, "reference_cpu_ms": 10.0, "measured_cpu_ms": 10.0 * r,
                "cpu_ratio": r - 0.1}  # fmt: skip

    per = {"w4a8": 6.0, "w8a8": 10.0}
    monkeypatch.setattr(api, "measure_table", lambda m, f, *a, **k: (table, per, dict.fromkeys(f)))
    monkeypatch.setattr(api, "whole_model_check", check)
    return calls


def test_a_missed_latency_budget_is_said_and_recorded(project, capsys, monkeypatch):
    tmp, _ = project
    calls = fake_timing(monkeypatch, [0.95, 0.91])  # 8 * 0.8/0.95 * 0.8/0.91 < 6 ms: stop
    argv = [*own_model(tmp), "-f", "w4a8,w8a8", "--max-latency-ratio", "0.8", "-o", tmp / "s"]
    code, out, err = cli(capsys, *argv)
    assert code == 0 and len(calls) == 2
    assert "ratio 0.91, CPU-time ratio 0.81" in out
    assert "budget NOT met: the deployed recipe measured 0.91x w8a8" in out
    assert "warning: latency budget NOT met" in err and "fastest assignment is 6 ms" in err
    budget = json.loads((tmp / "s" / "search.json").read_text())["budget"]
    assert budget["met"] is False and budget["measured_ratio"] == 0.91
    assert budget["not_met"] in out
    fake_timing(monkeypatch, [0.75])
    code, out, err = cli(capsys, *argv[:-1], tmp / "t")
    assert "latency budget met: 0.75x <= --max-latency-ratio 0.8" in out and "NOT" not in err
    assert json.loads((tmp / "t" / "search.json").read_text())["budget"]["met"] is True


BLOCK = """
import torch

from tests.mixed_precision._blocks import Block


def make():
    torch.manual_seed(0)
    return Block().eval()
"""


def test_the_summary_names_the_pruned_group_and_what_the_average_is_over(tmp_path, capsys):
    (tmp_path / "blocknet.py").write_text(BLOCK)
    sys.path.insert(0, str(tmp_path))
    try:
        import blocknet

        model = blocknet.make()
    finally:
        sys.path.remove(str(tmp_path))
    save_file(dict(model.state_dict()), tmp_path / "w.safetensors")
    torch.manual_seed(1)
    save_file({"x": torch.randn(32, 1, 6, 6)}, tmp_path / "x.safetensors")
    argv = ["blocknet:make", "--weights", tmp_path / "w.safetensors", "--data",
            tmp_path / "x.safetensors", "-f", "ch50+w8a8,w8a8", "--avg-bits", "5", "--groups",
            "--no-progress", "-o", tmp_path / "s"]  # fmt: skip
    sys.path.insert(0, str(tmp_path))
    try:
        code, out, _ = cli(capsys, *argv)
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 0, out
    summary = json.loads((tmp_path / "s" / "search.json").read_text())
    assert [(g["layers"], g["chosen"]) for g in summary["groups"]] == [(["stem", "b"], "ch50")]
    assert "channel pruning: residual group stem,b at ch50 (50% of its channels removed)" in out
    # every kept weight at 8 bits: 8 * kept / all 1,044 (stem and b lose half their rows,
    # a and head half their inputs), what --avg-bits bounds
    q = compactnn.compress(model, Recipe.from_yaml((tmp_path / "s" / "recipe.yaml").read_text()),
                           calib_data=torch.randn(8, 1, 6, 6), progress=False)  # fmt: skip
    kept = sum(q.get_submodule(n).weight.numel() for n in ("stem", "a", "b", "head"))
    assert summary["cost"]["avg_bits"] == pytest.approx(8 * kept / 1044)
    expected = f"{8 * kept / 1044:.3g} (code bits of the kept weights / the 1,044 weights "
    assert f"average bits per weight: {expected}before pruning; budget 5)" in out


def test_no_unreachable_max_bytes_is_suggested():
    # searched layers at least 3,784,704 B, the rest 5,772,501 B: 6e6 - rest is unreachable
    lines = search_command.size_lines(3_784_704, 9_557_205, 6e6, floor=3_784_704)
    note = lines[-1]
    # before: "... search with --max-bytes 227,499 (the rest of the artifact ...)"
    assert "--max-bytes 227,499" not in note
    assert "an artifact of at most 6,000,000 B is out of reach with these formats" in note
    assert "the searched layers at least 3,784,704 B" in note
    reachable = search_command.size_lines(1000, 3000, 2500, floor=400)[-1]
    assert "search with --max-bytes 500 (the rest of the artifact, 2,000 B" in reachable
