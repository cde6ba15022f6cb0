"""What `compactnn train` says: nothing trained when a finished checkpoint is resumed, a
doubt about the data before training, and how to convert a .pt/.npz data file."""

import argparse
import json
import types

import pytest
import torch
from safetensors.torch import save_file

from compactnn.cli import main
from compactnn.commands import train as train_command
from compactnn.errors import CompactnnError
from tests.commands.test_train_command import _setup, _train_args


def test_a_finished_checkpoint_resumed_says_nothing_was_trained(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    ckpt = str(tmp_path / "ck")
    assert main(_train_args(tmp_path, tmp_path / "a", "--checkpoint-dir", ckpt)) == 0
    capsys.readouterr()
    assert main(_train_args(tmp_path, tmp_path / "b", "--checkpoint-dir", ckpt)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "nothing left to train: saved qat_cli_factory:make trained with w4a4-lsq for 3 epochs"
    )
    assert lines[1] == f"  resumed from {ckpt}: all 3 epochs were already done (nothing trained)"
    log = tmp_path / "b.training.jsonl"  # the checkpoint's epochs, not an empty file
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert log.read_text() == (tmp_path / "a.training.jsonl").read_text()


def test_a_float_model_no_better_than_guessing_is_said_before_training(
    tmp_path, monkeypatch, capsys
):
    _setup(tmp_path, monkeypatch)
    xe = torch.zeros(40, 1, 8, 8)  # every sample alike: one answer for all, 1/3 right
    save_file({"x": xe, "y": torch.arange(40) % 3}, tmp_path / "eval.safetensors")

    def no_training(*_args, **_kwargs):
        raise CompactnnError("stopped before training")

    monkeypatch.setattr(train_command, "_train_model", no_training)
    args = _train_args(tmp_path, tmp_path / "o", "--eval-data", str(tmp_path / "eval.safetensors"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "warning: " in err and "barely above always answering" in err
    assert err.index("warning: ") < err.index("stopped before training")


@pytest.mark.parametrize("name", ["train.npz", "train.pt"])
def test_a_pt_or_npz_data_file_is_refused_with_how_to_convert_it(
    tmp_path, monkeypatch, capsys, name
):
    _setup(tmp_path, monkeypatch)
    (tmp_path / name).write_bytes(b"not read")
    args = _train_args(tmp_path, tmp_path / "o")
    args[args.index("--data") + 1] = str(tmp_path / name)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert (
        f"is a .{name.split('.')[1]} file: compactnn reads labelled data from .safetensors" in err
    )
    assert "save_file({'x': x, 'y': y}, 'train.safetensors')" in err


def test_every_quality_line_names_the_data_it_is_on(tmp_path, monkeypatch, capsys):
    """The held-out top-1 says which data it is on; a reference's own measure says it is on
    the reference's own held-out data, not on --data."""
    _setup(tmp_path, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    ev = tmp_path / "ev.safetensors"
    save_file({"x": torch.randn(24, 1, 8, 8, generator=gen), "y": torch.arange(24) % 3}, ev)
    real = train_command.load_model

    def with_a_reference(spec, args):
        loaded = real(spec, args)
        loaded.reference = types.SimpleNamespace(
            name="fake-ref", metric="top1", evaluate=lambda m: 12.5
        )
        return loaded

    monkeypatch.setattr(train_command, "load_model", with_a_reference)
    monkeypatch.setitem(train_command.REFERENCE_DATA, "fake-ref", "digits")
    args = _train_args(tmp_path, tmp_path / "o", "--eval-data", str(ev), "--epochs", "1")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "eval top-1 on 24 held-out samples: float " in out
    assert f"% - samples from --eval-data {ev}\n" in out
    assert "  top1 on fake-ref's own held-out data: float 12.50, trained 12.50\n" in out


def test_eval_source_words_each_kind_of_held_out_data():
    ref = types.SimpleNamespace(reference=types.SimpleNamespace(name="mnist-cnn"))
    ns = argparse.Namespace
    assert train_command.eval_source(ns(eval_data=None, data=None), ref) == (
        "the held-out split of mnist, the default --data"
    )
    assert train_command.eval_source(ns(eval_data=None, data="d.st"), ref) == (
        "--data d.st's held-out split"
    )
