"""Output paths never land on a command's own inputs: one relation (the same path, inside an
input folder, holding an input; symbolic and hard links included) behind every check."""

import argparse
import os
from pathlib import Path

import pytest

from compactnn.cli import main
from compactnn.commands._common import (
    check_apart_from_inputs,
    check_not_an_input,
    input_overlaps,
    path_relation,
)
from compactnn.commands.train import check_checkpoint_dir_option, check_log
from compactnn.errors import CompactnnError


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """``art/`` (an input folder: ``model.safetensors``, ``sub/``, ``linked.bin`` -> ``blob``),
    ``w.safetensors``, ``hard.jsonl`` (a hard link to ``art/model.safetensors``), ``soft``
    (a symbolic link to ``art``) and ``notes.txt`` (nobody's input)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "art" / "sub").mkdir(parents=True)
    for name in ("art/model.safetensors", "w.safetensors", "blob", "notes.txt"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "art" / "linked.bin").symlink_to(tmp_path / "blob")
    (tmp_path / "hard.jsonl").hardlink_to(tmp_path / "art" / "model.safetensors")
    (tmp_path / "soft").symlink_to(tmp_path / "art")
    return tmp_path


def _inode(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.mark.parametrize(
    ("path", "other", "want"),
    [
        ("art", "art", "same"),
        ("./art/", "art", "same"),
        ("soft", "art", "same"),  # a symbolic link to the folder
        ("x/../w.safetensors", "w.safetensors", "same"),
        ("hard.jsonl", "art/model.safetensors", "same"),  # a hard link
        ("art/new.json", "art", "inside"),
        ("soft/sub/new", "art", "inside"),
        ("hard.jsonl", "art", "inside"),  # a hard link to one of its files
        ("blob", "art", "inside"),  # the target of a symbolic link in it
        (".", "art", "holds"),
        ("art", "art/model.safetensors", "holds"),
        ("w.safetensors/new", "w.safetensors", None),  # nothing lies inside a file
        ("art2/x", "art", None),  # a name that only starts like the folder's
        ("notes.txt", "art", None),
        ("new.json", "w.safetensors", None),
    ],
)
def test_path_relation_resolves_links_and_names_same_inside_and_holds(layout, path, other, want):
    assert path_relation(path, other) == want
    assert path_relation(layout / path, layout / other) == want  # absolute: the same answer


def test_the_links_of_the_layout_are_what_the_relations_say(layout):
    """The premise of the table above, checked with os.stat: one inode, two names."""
    assert _inode("hard.jsonl") == _inode("art/model.safetensors")
    assert _inode("art/linked.bin") == _inode("blob") != _inode("notes.txt")
    assert os.path.realpath("soft/sub") == os.path.realpath("art/sub")


def test_a_link_to_a_file_in_an_input_folder_is_never_overwritten(layout):
    """Writing ``hard.jsonl`` in place truncates ``art/model.safetensors`` (one inode), and
    writing ``blob`` changes ``art/linked.bin``: both are files of the input folder."""
    inputs = {"MODEL": "art", "--weights": "w.safetensors"}
    for out in ("hard.jsonl", "blob"):
        with pytest.raises(CompactnnError) as info:
            check_not_an_input(out, "--log", inputs, "train.jsonl")
        assert str(info.value).startswith(
            f"--log {out!r} is a file inside the MODEL folder 'art': writing there would "
            "destroy an input of this command (--force or not)."
        )
        with pytest.raises(CompactnnError, match=f"^--out {out!r} is inside the MODEL folder"):
            check_apart_from_inputs(out, "--out", inputs, "out.gguf")
    check_not_an_input("notes.txt", "--json", inputs, "eval.json")  # nobody's input
    check_apart_from_inputs("w.safetensors/x", "--out", inputs, "x")  # under a file: no claim


def test_input_overlaps_lists_every_input_met_in_order(layout):
    inputs = {"MODEL": "art", "--data": None, "--weights": "w.safetensors"}
    assert [(n, how) for n, _, _, how in input_overlaps(".", inputs)] == [
        ("MODEL", "holds"),
        ("--weights", "holds"),
    ]
    [(name, spec, path, how)] = input_overlaps("soft/model.safetensors", inputs)
    assert (name, spec, path, how) == ("MODEL", "art", Path("art"), "inside")
    assert list(input_overlaps("notes.txt", inputs)) == []


def _train_args(**given) -> argparse.Namespace:
    args = dict(model="art", weights=None, data="w.safetensors", eval_data=None, log=None)
    args.update(checkpoint_dir=None, no_resume=False, force=True)
    return argparse.Namespace(**{**args, **given})


def test_train_refuses_a_log_hard_linked_to_a_file_of_the_model_folder(layout):
    """The training log is opened in place ("w"): a hard link to a MODEL folder's file would
    truncate that file. It used to pass with --force (the link lies outside the folder)."""
    args = _train_args(log="hard.jsonl")
    with pytest.raises(
        CompactnnError, match=r"^--log 'hard\.jsonl' is in MODEL 'art', whose files"
    ):
        check_log(Path("hard.jsonl"), Path("out"), args)
    check_log(Path("notes.txt"), Path("out"), _train_args(log="notes.txt"))  # --force: fine
    before = (layout / "art" / "model.safetensors").read_bytes()
    argv = ["train", "art", "-r", "w4a4-lsq", "--data", "w.safetensors", "--out", "out"]
    assert main([*argv, "--log", "hard.jsonl", "--force"]) == 2
    assert (layout / "art" / "model.safetensors").read_bytes() == before
    assert not (layout / "out").exists()


@pytest.mark.parametrize(
    ("ckpt", "words"),
    [
        ("w.safetensors", "is the --data file 'w.safetensors', not a folder"),
        ("w.safetensors/ck", "lies under the file 'w.safetensors', not a folder"),
        ("art/ck", "is in MODEL 'art', whose files the checkpoint would mix with"),
        ("soft", "is in MODEL 'art'"),
        ("out/ck", "is in --out 'out'"),
        ("log.jsonl", "is the training log 'log.jsonl' or lies under it"),
    ],
)
def test_train_checkpoint_dir_is_refused_on_an_input_in_out_or_on_the_log(layout, ckpt, words):
    with pytest.raises(CompactnnError) as info:
        check_checkpoint_dir_option(
            _train_args(checkpoint_dir=ckpt), Path("out"), Path("log.jsonl")
        )
    assert str(info.value).startswith(f"--checkpoint-dir {ckpt!r} {words}")
