"""The command line's last lines of defence (a security review's findings): plugins that
raise or exit at import, over-long messages, names too long for the file system, and
Ctrl-C while a re-executed command is still importing."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compactnn import cli
from compactnn.errors import CompactnnError
from tests._cli import run_cli

FACTORY = "from torch import nn\n\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 2))\n"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A factory module with weights and data in the current folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bounds_net.py").write_text(FACTORY)
    torch.manual_seed(0)
    save_file(nn.Sequential(nn.Linear(4, 2)).state_dict(), tmp_path / "w.safetensors")
    save_file({"x": torch.randn(8, 4)}, tmp_path / "x.safetensors")
    return tmp_path


COMPRESS = ["compress", "bounds_net:make", "--weights", "w.safetensors", "-d", "x.safetensors"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            "raise RuntimeError('boom in plugin')\n",
            "failed while being imported (RuntimeError: boom",
        ),
        ("import sys\nsys.exit(0)\n", "called sys.exit(0) while being imported"),
        ("raise SystemExit('bye')\n", "called sys.exit('bye')"),
    ],
)
def test_a_plugin_that_raises_or_exits_at_import_is_one_error_line(project, capsys, body, needle):
    (project / "bounds_plug.py").write_text(body)
    try:
        code, _out, err = run_cli(
            capsys, *COMPRESS, "-r", "w8", "-o", "art", "--plugin", "bounds_plug"
        )
    finally:
        sys.modules.pop("bounds_plug", None)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: --plugin 'bounds_plug' "), err
    assert needle in err and not (project / "art").exists()


def test_an_overlong_message_is_cut_in_the_middle(monkeypatch, capsys):
    message = "recipe '" + "x" * 5_000_000 + "' has no steps: add one."

    def run(args):
        raise CompactnnError(message)

    monkeypatch.setattr("compactnn.commands.recipes.run", run)
    code, _out, err = run_cli(capsys, "recipes")
    assert code == 2
    assert len(err) < cli.MAX_MESSAGE + 100, len(err)
    assert err.startswith("error: recipe 'xxx") and err.endswith("' has no steps: add one.\n")
    assert f"[... {len(message) - cli.MAX_MESSAGE} characters cut ...]" in err


def test_a_short_message_is_whole():
    assert cli.bounded("x" * cli.MAX_MESSAGE) == "x" * cli.MAX_MESSAGE


def test_a_name_too_long_is_one_line_naming_the_path_cut(monkeypatch, capsys):
    long = "o/" + "y" * 5000

    def run(args):
        raise OSError(errno.ENAMETOOLONG, "File name too long", long)

    monkeypatch.setattr("compactnn.commands.recipes.run", run)
    code, _out, err = run_cli(capsys, "recipes")
    assert code == 2
    assert err.startswith("error: 'o/yyy") and "... (4802 more characters)" in err
    assert err.endswith("File name too long; choose a shorter file or folder name.\n")


@pytest.mark.parametrize("out", ["o/" + "x" * 300, "o/" + "/".join(["d" * 200] * 25)])
def test_compress_refuses_a_name_too_long_before_compressing(project, capsys, monkeypatch, out):
    def never(*args, **kwargs):
        raise AssertionError("compressed before checking --out")

    monkeypatch.setattr("compactnn.api.compress", never)
    code, _out, err = run_cli(capsys, *COMPRESS, "-r", "w8", "-o", out, "--no-progress")
    assert code == 2, err
    assert err.startswith("error: --out 'o/") and err.count("\n") == 1, err
    assert "longer than this" in err and "more characters)" in err
    assert not (project / "o").exists()


def test_a_sigint_held_across_the_exec_stops_the_new_process_cleanly(monkeypatch, capsys):
    """In-process: a Ctrl-C pending while SIGINT is blocked, as the re-executed process
    inherits it, is raised inside main: ``interrupted``, status 130, no traceback."""
    monkeypatch.setenv(cli.SIGINT_HELD, "1")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # pending until unblocked
        code, out, err = run_cli(capsys, "recipes")
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    assert (code, err, out) == (cli.EXIT_INTERRUPTED, "interrupted\n", "")
    assert cli.SIGINT_HELD not in os.environ


def test_without_a_reexec_a_held_sigint_raises_when_released():
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with cli.sigint_held_across_exec():
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this thread
            time.sleep(0.05)
            reached = True  # not raised while held
    assert reached and cli.SIGINT_HELD not in os.environ


def test_ctrl_c_while_the_command_loads_torch(tmp_path):
    """A real process: a SIGINT while the command imports torch (seconds at its start, after
    it set OpenMP's policy) ends it with ``interrupted``, status 130, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.pop("COMPACTNN_OMP_REEXEC", None)
    argv = [sys.executable, "-P", "-m", "compactnn.cli", "compress", "none.pt2", "-r", "w8"]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while b"libtorch" not in _maps(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (cli.EXIT_INTERRUPTED, "interrupted\n"), err[-2000:]


def _maps(pid: int) -> bytes:
    """The files process ``pid`` has mapped (its loaded libraries)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return f.read()
    except OSError:
        return b""
