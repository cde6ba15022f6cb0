"""Paths on the command line: refused before any work when they cannot mean what the user
meant (an empty MODEL, a symbolic link loop, a quoted ``~``), and printed back so that a
command shown to the user can be pasted (a path that starts with ``-``)."""

import argparse
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compactnn.commands._common import model_words
from compactnn.commands._path_args import check_tilde, shown_path
from compactnn.commands.compress import eval_command
from compactnn.model_io import LoadedModel
from tests.commands._compress_cli import assert_one_error_line, run_cli

NET = "from torch import nn\ndef build():\n    return nn.Sequential(nn.Linear(8, 4), nn.ReLU())\n"


def test_a_path_that_starts_with_a_dash_is_printed_with_dot_slash():
    ns = argparse.Namespace(
        model="-m.pt", weights="-w.safetensors", trust_pickle=True, data="-d x.safetensors"
    )
    loaded = LoadedModel(None, "-m.pt")
    assert eval_command(Path("-out"), ns, loaded) == (
        "compactnn eval ./-out --model ./-m.pt --weights ./-w.safetensors --trust-pickle "
        "--data './-d x.safetensors'"
    )
    assert model_words(ns, loaded)[1] == "./-w.safetensors"
    assert shown_path(Path("out dir/-x")) == "out dir/-x"  # not at the start: nothing to add


def test_compress_prints_an_artifact_and_eval_line_that_can_be_pasted(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dashnet.py").write_text(NET)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    save_file(model.state_dict(), "-w.safetensors")
    code, out, err = run_cli(
        capsys, "compress", "dashnet:build", "--weights", "./-w.safetensors",
        "--recipe", "w8", "--out", "./-out", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "  artifact: ./-out  " in out
    assert (
        "  evaluate it: compactnn eval ./-out --model dashnet:build --weights ./-w.safetensors"
        in out
    )
    assert (tmp_path / "-out" / "compactnn.json").is_file()


def test_a_model_path_read_as_an_option_names_the_dot_slash_form(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-m.pt").write_bytes(b"x")
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, "compress", "-m.pt", "--trust-pickle", "--recipe", "w8")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: MODEL (a path that starts with '-' reads " in err
    assert "write ./-m.pt)" in err
    with pytest.raises(SystemExit):  # a mistyped option gets no path hint
        run_cli(capsys, "compress", "mnist-cnn", "--recipe", "w8", "--frobnicate")
    assert "./--frobnicate" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "", "--recipe", "w4a8"], "error: MODEL '' is empty: pass a reference model"),
        (["compress", " ", "--recipe", "w8"], "error: MODEL ' ' is empty: pass a reference model"),
        (["eval", ""], "error: MODEL_OR_ARTIFACT '' is empty: pass an artifact folder"),
        (["deploy", ""], "error: MODEL_OR_ARTIFACT '' is empty: pass an artifact folder"),
        (["export", "", "--list"], "error: ARTIFACT '' is empty: pass an artifact folder"),
    ],
)
def test_an_empty_model_is_named_before_anything_else(capsys, argv, message):
    assert assert_one_error_line(capsys, argv).startswith(message)


def test_a_symbolic_link_loop_is_named_as_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.symlink("loopb", "loopa")
    os.symlink("loopa", "loopb")
    loop = "is a symbolic link loop (loopa -> loopb): point the link at a real file or folder"
    argv = ["compress", "mnist-cnn", "--recipe", "w8", "--out", "loopa"]
    assert_one_error_line(capsys, argv, f"--out 'loopa' {loop}")
    argv = ["compress", "dashnet:build", "--weights", "loopa", "--recipe", "w8"]
    assert_one_error_line(capsys, argv, f"--weights 'loopa' {loop}")
    argv = ["compress", "mnist-cnn", "--recipe", "w8", "--out", "loopa/x"]  # through a loop
    assert_one_error_line(capsys, argv, "--out 'loopa/x' is a symbolic link loop: ")


def test_a_tilde_the_shell_did_not_expand_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    argv = ["compress", "mnist-cnn", "--recipe", "w8", "--out", "~/x"]
    assert_one_error_line(
        capsys, argv, "--out '~/x' starts with '~', which the shell expands only at the start "
        f"of an unquoted word: write --out ~/x without quotes (and without '='), or give "
        f"'{tmp_path}/home/x'."
    )  # fmt: skip
    argv = ["compress", "dashnet:build", "--weights", "~/w.safetensors", "--recipe", "w8"]
    assert_one_error_line(capsys, argv, "--weights '~/w.safetensors' starts with '~'")
    assert not (tmp_path / "~").exists()  # no folder named ~ made
    (tmp_path / "~" / "x").mkdir(parents=True)  # a path really named ~/x is the user's to use
    check_tilde("~/x", "--out")


@pytest.mark.parametrize(
    "word", ["plain", "out dir", "it's", "m\udcff.pt", "r\u00e9\udce9 'q'\\x", "-\udc80\n"]
)
def test_shell_join_gives_bash_the_same_bytes_back(word):
    """Each word, undecodable path bytes included, reaches a program as the bytes it stands for."""
    import shutil
    import subprocess

    from compactnn.commands._path_args import shell_join

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    line = shell_join(["printf", "%s", word])
    assert not any("\udc80" <= c <= "\udcff" for c in line)  # no raw undecodable byte
    out = subprocess.run([bash, "-c", line], capture_output=True, check=True).stdout
    assert out == word.encode("utf-8", "surrogateescape")


def test_the_evaluate_hint_of_an_undecodable_folder_can_be_pasted():
    ns = argparse.Namespace(model="mnist-cnn", weights=None, trust_pickle=False, data=None)
    line = eval_command(Path("out/\udcffx"), ns, LoadedModel(None, "mnist-cnn"))
    assert "$'out/\\xffx'" in line and "\udcff" not in line
