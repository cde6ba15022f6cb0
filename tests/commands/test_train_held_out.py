"""``compactnn train --data FILE`` without ``--eval-data``: a file holding x_test/y_test
beside x_train/y_train is scored on its held-out split (said); one of a single split is not;
``--epochs`` below 1 is refused (see also test_train_command.py)."""

import json

import torch

import compactnn
from compactnn.cli import main
from tests.commands.test_train_command import _setup, _split_file, _train_args


def test_a_data_files_held_out_split_is_scored_without_eval_data(tmp_path, monkeypatch, capsys):
    model, x = _setup(tmp_path, monkeypatch)
    y = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(3))
    path, split = _split_file(tmp_path, x, y)
    out = tmp_path / "out"
    args = _train_args(tmp_path, out, "--epochs", "1")
    args[args.index("--data") + 1] = path
    assert main(args) == 0
    captured = capsys.readouterr()
    assert (
        f"note: --data {path} holds a held-out split (x_test/y_test) beside the training one: "
        "scoring it after every epoch (pass --eval-data FILE for other data)"
    ) in captured.err
    q = compactnn.load(out, model=model)
    with torch.no_grad():
        held_out = 100.0 * float((q(split["x_test"]).argmax(1) == split["y_test"]).sum()) / 32
    assert "eval top-1 on 32 held-out samples: float " in captured.out
    assert f"trained {held_out:.2f}%" in captured.out
    log = [json.loads(t) for t in (tmp_path / "out.training.jsonl").read_text().splitlines()]
    assert log[-1]["eval_top1"] is not None


def test_a_data_file_of_one_split_scores_nothing(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    assert main(_train_args(tmp_path, tmp_path / "out", "--epochs", "1")) == 0
    captured = capsys.readouterr()
    assert "held-out" not in captured.out and "held-out split" not in captured.err
