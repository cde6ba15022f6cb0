import json
import shlex

import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    )
"""


def _setup(tmp_path, monkeypatch):
    (tmp_path / "qat_cli_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import qat_cli_factory

    model = qat_cli_factory.make()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (96,), generator=gen)
    save_file({"x": x, "y": y}, tmp_path / "data.safetensors")
    save_file({"x": x}, tmp_path / "nolabels.safetensors")
    return model, x


def test_train_command_writes_a_loadable_artifact(tmp_path, monkeypatch, capsys):
    model, x = _setup(tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = [
        "train",
        "qat_cli_factory:make",
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--recipe",
        "w1a1-bireal",
        "--data",
        str(tmp_path / "data.safetensors"),
        "--epochs",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trained qat_cli_factory:make with w1a1-bireal for 1 epoch in" in printed
    q = compactnn.load(out, model=model)
    assert q(x).shape == (96, 3)
    # the printed eval line names the model and its weights, never the training data (x/y
    # only: no held-out split), and it runs once given a held-out file
    line = next(t for t in printed.splitlines() if "evaluate it: " in t).split(": ", 1)[1]
    weights, data = str(tmp_path / "w.safetensors"), str(tmp_path / "data.safetensors")
    model_words = ["--model", "qat_cli_factory:make", "--weights", weights]
    words = [*model_words, "--data", "HELD_OUT_FILE"]
    assert line == shlex.join(["compactnn", "eval", str(out), *words])
    assert main(shlex.split(line.replace("HELD_OUT_FILE", data))[1:]) == 0
    assert main(args) == 2  # the artifact exists: refused without --force


def test_train_command_refuses_data_without_labels(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    rc = main(
        [
            "train",
            "qat_cli_factory:make",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--recipe",
            "w4a4-lsq",
            "--data",
            str(tmp_path / "nolabels.safetensors"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "labels" in capsys.readouterr().err


def _train_args(tmp_path, out, *extra):
    return [
        "train",
        "qat_cli_factory:make",
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--recipe",
        "w4a4-lsq",
        "--data",
        str(tmp_path / "data.safetensors"),
        "--epochs",
        "3",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_train_command_scores_eval_data_and_keeps_the_best_epoch(tmp_path, monkeypatch, capsys):
    model, _ = _setup(tmp_path, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    xe, ye = torch.randn(40, 1, 8, 8, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    save_file({"x": xe, "y": ye}, tmp_path / "eval.safetensors")
    out = tmp_path / "out"
    args = _train_args(tmp_path, out, "--eval-data", str(tmp_path / "eval.safetensors"))
    assert main([*args, "--keep-best"]) == 0
    printed = capsys.readouterr().out
    log = tmp_path / "out.training.jsonl"  # beside the artifact directory, not inside it
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert f"  epoch {r['epoch']}/3: train loss " in printed
        assert f"eval top-1 {r['eval_top1']:.2f}%" in printed
    scores = [r["eval_top1"] for r in records]
    kept = max(i for i, s in enumerate(scores) if s == max(scores)) + 1
    q = compactnn.load(out, model=model)
    with torch.no_grad():
        top1 = 100.0 * float((q(xe).argmax(1) == ye).sum()) / 40
        float_top1 = 100.0 * float((model(xe).argmax(1) == ye).sum()) / 40
    assert round(top1, 4) == max(scores)
    assert (
        f"eval top-1 on 40 held-out samples: float {float_top1:.2f}%, trained {top1:.2f}% "
        f"(epoch {kept} kept, the best)"
    ) in printed
    assert compactnn.info_of(q)["extra"]["training"]["kept_epoch"] == kept
    assert f"training log: {log}" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "compactnn.json",
        "model.safetensors",
        "recipe.yaml",
    ]


def test_train_command_eval_mistakes_are_one_error_line(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    assert main(_train_args(tmp_path, tmp_path / "a", "--keep-best")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --keep-best") and "--eval-data" in err
    assert len(err.strip().splitlines()) == 1
    bad = str(tmp_path / "nolabels.safetensors")
    assert main(_train_args(tmp_path, tmp_path / "b", "--eval-data", bad)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --eval-data {bad}: eval_data is a dict with keys ['x']")
    assert len(err.strip().splitlines()) == 1
    assert main(_train_args(tmp_path, tmp_path / "c", "--eval-data", "nope.csv")) == 2
    assert "error: --eval-data nope.csv: unknown training data" in capsys.readouterr().err


def _interrupt_after_first_epoch(monkeypatch):
    """Ctrl-C at the end of epoch 1, after its log record (and checkpoint, if any) is written."""
    from compactnn.training import loop

    checkpoint = loop._checkpoint

    def interrupted(env, directory, r):
        checkpoint(env, directory, r)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_checkpoint", interrupted)


def test_interrupted_train_leaves_no_log_beside_the_missing_artifact(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    _interrupt_after_first_epoch(monkeypatch)
    out = tmp_path / "out"
    assert main(_train_args(tmp_path, out)) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"
    assert not out.exists()
    assert not (tmp_path / "out.training.jsonl").exists()


def test_interrupted_train_keeps_a_log_the_user_named_and_says_so(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    _interrupt_after_first_epoch(monkeypatch)
    log = tmp_path / "logs" / "run.jsonl"
    assert main(_train_args(tmp_path, tmp_path / "out", "--log", str(log))) == 130
    err = capsys.readouterr().err
    assert f"training log of the interrupted run kept: {log}" in err and "no artifact" in err
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1]
    assert not (tmp_path / "out").exists()


def test_interrupted_train_with_a_checkpoint_keeps_the_log_it_resumes(
    tmp_path, monkeypatch, capsys
):
    _setup(tmp_path, monkeypatch)
    _interrupt_after_first_epoch(monkeypatch)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    args = _train_args(tmp_path, out, "--checkpoint-dir", str(ckpt))
    assert main(args) == 130
    log = tmp_path / "out.training.jsonl"
    err = capsys.readouterr().err
    assert f"training log kept: {log}" in err and "resume" in err
    monkeypatch.undo()  # no more interruptions: the rerun resumes and appends to the log
    _setup(tmp_path, monkeypatch)
    assert main(args) == 0
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_interrupted_train_leaves_an_earlier_runs_log_alone(tmp_path, monkeypatch, capsys):
    """A log this run never wrote (Ctrl-C before training) is not removed."""
    _setup(tmp_path, monkeypatch)
    log = tmp_path / "out.training.jsonl"
    log.write_text('{"epoch": 1}\n')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compactnn, "train", interrupted)
    assert main(_train_args(tmp_path, tmp_path / "out", "--force")) == 130
    assert log.read_text() == '{"epoch": 1}\n'


def test_failed_train_removes_its_default_log_and_keeps_a_named_one(tmp_path, monkeypatch, capsys):
    from compactnn.errors import CompactnnError
    from compactnn.training import loop

    _setup(tmp_path, monkeypatch)

    def failing(env, directory, r):
        raise CompactnnError("the loss is not finite")

    monkeypatch.setattr(loop, "_checkpoint", failing)
    assert main(_train_args(tmp_path, tmp_path / "out")) == 2
    assert not (tmp_path / "out.training.jsonl").exists()
    log = tmp_path / "run.jsonl"
    assert main(_train_args(tmp_path, tmp_path / "out", "--log", str(log))) == 2
    err = capsys.readouterr().err
    assert f"training log of the failed run kept: {log}" in err and log.is_file()


def _split_file(tmp_path, x, y):
    """A file with a training split and a held-out split (the last 32 samples)."""
    split = {"x_train": x[:64], "y_train": y[:64], "x_test": x[64:], "y_test": y[64:]}
    save_file({k: v.contiguous() for k, v in split.items()}, tmp_path / "split.safetensors")
    return str(tmp_path / "split.safetensors"), split


def test_the_printed_eval_line_scores_the_held_out_split(tmp_path, monkeypatch, capsys):
    """--data F --eval-data F of a file with both splits: train scores x_test after every
    epoch, and the eval line it prints scores x_test again (not x_train), saying so."""
    model, x = _setup(tmp_path, monkeypatch)
    y = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(3))
    path, split = _split_file(tmp_path, x, y)
    out = tmp_path / "out"
    args = _train_args(tmp_path, out, "--eval-data", path, "--epochs", "1")
    args[args.index("--data") + 1] = path
    assert main(args) == 0
    printed = capsys.readouterr().out
    line = next(t for t in printed.splitlines() if "evaluate it: " in t).split(": ", 1)[1]
    assert shlex.split(line)[-2:] == ["--data", path]
    q = compactnn.load(out, model=model)
    with torch.no_grad():
        held_out = 100.0 * float((q(split["x_test"]).argmax(1) == split["y_test"]).sum()) / 32
        trained_on = 100.0 * float((q(split["x_train"]).argmax(1) == split["y_train"]).sum()) / 64
    assert held_out != trained_on  # the two splits score apart: the test tells which was used
    assert "held-out samples: float " in printed and f"trained {held_out:.2f}%" in printed
    report = tmp_path / "eval.json"
    eval_args = [*shlex.split(line)[1:], "--simulated", "--quick", "--no-progress"]
    assert main([*eval_args, "--json", str(report)]) == 0
    rows = {r["model"]: r for r in json.loads(report.read_text())["rows"]}
    assert round(rows["compressed"]["quality"], 4) == round(held_out, 4)
    assert "using x_test/y_test (the held-out split)" in capsys.readouterr().err


def test_the_printed_eval_line_uses_a_files_test_split_without_eval_data(
    tmp_path, monkeypatch, capsys
):
    _, x = _setup(tmp_path, monkeypatch)
    path, _ = _split_file(tmp_path, x, torch.randint(0, 3, (96,)))
    args = _train_args(tmp_path, tmp_path / "out", "--epochs", "1")
    args[args.index("--data") + 1] = path
    assert main(args) == 0
    line = next(t for t in capsys.readouterr().out.splitlines() if "evaluate it: " in t)
    assert shlex.split(line.split(": ", 1)[1])[-2:] == ["--data", path]


def test_the_printed_eval_line_names_held_out_data_eval_reads():
    import argparse

    from compactnn.commands.train import eval_data_words
    from compactnn.model_io import LoadedModel

    own, ref = LoadedModel(None, "pkg:make"), LoadedModel(None, "mnist-cnn", reference=object())

    def words(loaded, data=None, eval_data=None, tensors=None):
        return eval_data_words(argparse.Namespace(data=data, eval_data=eval_data), tensors, loaded)

    assert words(own, "train.safetensors", "held.safetensors") == "held.safetensors"
    assert words(own, "train.safetensors", tensors={"x": 0, "y": 0}) == "HELD_OUT_FILE"
    assert words(own, "mnist", "mnist") == "mnist"  # eval scores its held-out split
    assert words(own, "digits") == "digits"
    assert words(ref, "mnist", "mnist") is None  # eval scores the reference's own test split
    assert words(ref) is None


def test_epochs_below_one_are_refused_before_training(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    save_file(
        {"x": torch.randn(8, 1, 8, 8), "y": torch.zeros(8).long()}, tmp_path / "e.safetensors"
    )
    args = _train_args(tmp_path, tmp_path / "out", "--eval-data", str(tmp_path / "e.safetensors"))
    for extra in (["--epochs", "0"], ["--keep-best", "--epochs", "0"], ["--epochs", "-1"]):
        assert main([*args, *extra]) == 2
        n = extra[-1]
        assert capsys.readouterr().err == (
            f"error: --epochs {n} trains nothing: pass --epochs 1 or more (or leave it out for "
            "the recipe's), or run `compactnn compress` for a model calibrated without training.\n"
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.training.jsonl").exists()


def _no_training(monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("training began")

    monkeypatch.setattr(compactnn, "train", train)


def test_a_log_that_is_an_input_or_in_out_is_refused_even_with_force(tmp_path, monkeypatch, capsys):
    """--log naming the weights, the data, the eval data, the checkpoint or a path in --out
    is refused before the model is loaded, --force or not: every file stays byte-identical."""
    model, _ = _setup(tmp_path, monkeypatch)
    art = tmp_path / "art"  # an existing artifact: --force passes check_out, not check_log
    compactnn.save(compactnn.compress(model, "w8", progress=False), art)
    _no_training(monkeypatch)
    eval_file, ckpt, out = tmp_path / "eval.safetensors", tmp_path / "ck", tmp_path / "out"
    save_file({"x": torch.zeros(4, 1, 8, 8), "y": torch.zeros(4).long()}, eval_file)
    ckpt.mkdir()
    (ckpt / "qat-checkpoint.pt").write_bytes(b"a checkpoint")
    files = [tmp_path / n for n in ("w.safetensors", "data.safetensors", "eval.safetensors")]
    files += [ckpt / "qat-checkpoint.pt", *art.iterdir()]
    before = {f: f.read_bytes() for f in files}
    cases = {
        str(tmp_path / "w.safetensors"): "is the --weights file",
        str(tmp_path / "data.safetensors"): "is the --data file",
        str(eval_file): "is the --eval-data file",
        str(ckpt / "qat-checkpoint.pt"): "is the --checkpoint-dir file",
        str(tmp_path / "ck" / ".." / "w.safetensors"): "is the --weights file",
        str(out): f"is in --out {str(out)!r}",
        str(out / "sub" / "new.jsonl"): f"is in --out {str(out)!r}",
    }
    extra = ["--eval-data", str(eval_file), "--checkpoint-dir", str(ckpt), "--no-resume"]
    for log, words in cases.items():
        for force in ([], ["--force"]):
            assert main(_train_args(tmp_path, out, *extra, "--log", log, *force)) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: --log {log!r} {words}"), err
    log = str(art / "model.safetensors")
    assert main(_train_args(tmp_path, art, "--log", log, "--force")) == 2
    assert capsys.readouterr().err.startswith(f"error: --log {log!r} is in --out {str(art)!r}")
    assert {f: f.read_bytes() for f in files} == before
    assert not out.exists() and not list(tmp_path.glob("*.jsonl"))


def test_a_symlink_or_hard_link_to_the_data_is_refused_as_a_log(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    _no_training(monkeypatch)
    data = tmp_path / "data.safetensors"
    before = data.read_bytes()
    (tmp_path / "soft.jsonl").symlink_to(data)
    (tmp_path / "hard.jsonl").hardlink_to(data)
    for log in ("soft.jsonl", "hard.jsonl"):
        args = _train_args(tmp_path, tmp_path / "out", "--log", str(tmp_path / log), "--force")
        assert main(args) == 2
        assert "is the --data file" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_an_existing_log_is_refused_without_force_and_replaced_with_it(
    tmp_path, monkeypatch, capsys
):
    _setup(tmp_path, monkeypatch)
    named, default = tmp_path / "notes.jsonl", tmp_path / "out.training.jsonl"
    for f in (named, default):
        f.write_text('{"my": "notes"}\n')
    with monkeypatch.context() as m:
        _no_training(m)
        assert main(_train_args(tmp_path, tmp_path / "out", "--log", str(named))) == 2
        err = capsys.readouterr().err
        assert err == (
            f"error: --log {str(named)!r} exists; pass --force to replace it, or --log FILE "
            "naming another file.\n"
        )
        assert main(_train_args(tmp_path, tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: the training log {str(default)!r} (the default, beside")
        assert "exists; pass --force to replace it" in err
        assert named.read_text() == default.read_text() == '{"my": "notes"}\n'
        assert not (tmp_path / "out").exists()
    args = _train_args(tmp_path, tmp_path / "out", "--epochs", "1")
    assert main([*args, "--log", str(named), "--force"]) == 0
    assert [json.loads(line)["epoch"] for line in named.read_text().splitlines()] == [1]
    assert main([*_train_args(tmp_path, tmp_path / "out", "--epochs", "1"), "--force"]) == 0
    assert [json.loads(line)["epoch"] for line in default.read_text().splitlines()] == [1]


def test_a_forced_failed_run_keeps_the_log_it_did_not_create(tmp_path, monkeypatch, capsys):
    """--force replaced an earlier default log and the run failed: the file is not removed
    (only a log this run created is); a log this run created is."""
    from compactnn.errors import CompactnnError
    from compactnn.training import loop

    _setup(tmp_path, monkeypatch)

    def failing(env, directory, r):
        raise CompactnnError("the loss is not finite")

    monkeypatch.setattr(loop, "_checkpoint", failing)
    log = tmp_path / "out.training.jsonl"
    log.write_text('{"my": "notes"}\n')
    assert main(_train_args(tmp_path, tmp_path / "out", "--force")) == 2
    assert f"training log of the failed run kept: {log}" in capsys.readouterr().err
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1]
    log.unlink()
    assert main(_train_args(tmp_path, tmp_path / "out", "--force")) == 2
    assert not log.exists()


def test_a_resumed_train_says_where_it_resumed(tmp_path, monkeypatch, capsys):
    """A rerun with --checkpoint-dir says it resumed, and from which epoch; a rerun after a
    finished run says every epoch was already done (and writes the same model again)."""
    _setup(tmp_path, monkeypatch)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    args = _train_args(tmp_path, out, "--checkpoint-dir", str(ckpt))
    with monkeypatch.context() as patch:
        _interrupt_after_first_epoch(patch)
        assert main(args) == 130
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("  resumed")]
    assert lines == [f"  resumed from {ckpt} at epoch 2 of 3"]
    digest = compactnn.artifact_digest(out)
    assert main([*args, "--force"]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("  resumed")]
    assert lines == [f"  resumed from {ckpt}: all 3 epochs were already done (nothing trained)"]
    assert compactnn.artifact_digest(out) == digest
    assert main(_train_args(tmp_path, tmp_path / "fresh", "--no-progress")) == 0
    assert "  resumed from" not in capsys.readouterr().out  # no checkpoint: nothing resumed


def test_a_checkpoint_dir_that_is_a_file_an_input_or_in_out_is_refused_before_training(
    tmp_path, monkeypatch, capsys
):
    """--checkpoint-dir naming a file (an input or not), a path in --out or in the MODEL
    folder, or the training log: one error line before the model is loaded (it used to
    train an epoch, then die in mkdir with FileExistsError, or fail at save: --out held
    the checkpoint); no file changes, no artifact, no log."""
    model, _ = _setup(tmp_path, monkeypatch)
    art = tmp_path / "art"
    compactnn.save(compactnn.compress(model, "w8", progress=False), art)
    _no_training(monkeypatch)
    other, out = tmp_path / "notes.txt", tmp_path / "out"
    other.write_text("mine")
    files = [tmp_path / "w.safetensors", tmp_path / "data.safetensors", other, *art.iterdir()]
    before = {f: f.read_bytes() for f in files}
    data = str(tmp_path / "data.safetensors")
    cases = {
        str(other): "is a file, not a folder: pass --checkpoint-dir DIR naming a folder",
        str(other / "ck"): f"lies under the file {str(other)!r}, not a folder",
        data: f"is the --data file {data!r}, not a folder",
        str(tmp_path / "w.safetensors"): "is the --weights file",
        str(out): f"is in --out {str(out)!r}",
        str(out / "ck"): f"is in --out {str(out)!r}",
        str(tmp_path / "out.training.jsonl"): "is the training log",
    }
    for ckpt, words in cases.items():
        assert main(_train_args(tmp_path, out, "--checkpoint-dir", ckpt)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --checkpoint-dir {ckpt!r} {words}"), err
        assert err.count("\n") == 1
    args = ["train", str(art), "--recipe", "w4a4-lsq", "--data", data, "--out", str(out)]
    assert main([*args, "--checkpoint-dir", str(art / "ck")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --checkpoint-dir {str(art / 'ck')!r} is in")
    assert {f: f.read_bytes() for f in files} == before
    assert not out.exists() and not list(tmp_path.glob("*.jsonl"))
