"""SIGTERM (timeout, Slurm, systemd) stops a command as Ctrl-C does: its cleanup runs (the
training log of a run that wrote no artifact is removed, so a plain rerun is not refused),
one line is printed and the status is 143. Run in a real process sent a real SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))
"""
# a --plugin that blocks at the start of the second epoch, once the first one is logged
HOOK = """
import os
import time

from compactnn.training import loop

_start = loop.start_epoch


def start_epoch(qat, epoch, epochs):
    if epoch >= 1:
        open(os.environ["SIGTERM_READY"], "w").close()
        time.sleep(120)
    return _start(qat, epoch, epochs)


loop.start_epoch = start_epoch
"""


def _train(tmp_path, *extra) -> subprocess.Popen:
    (tmp_path / "sigterm_factory.py").write_text(FACTORY)
    (tmp_path / "sigterm_hook.py").write_text(HOOK)
    model = nn_model(tmp_path)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 4, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    save_file({"x": x, "y": y}, tmp_path / "d.safetensors")
    argv = ["train", "sigterm_factory:make", "--weights", "w.safetensors", "-r", "w4a4-lsq"]
    argv += ["--data", "d.safetensors", "--epochs", "3", "--out", "out", "--no-progress"]
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "SIGTERM_READY": str(tmp_path / "ready"), "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, "-m", "compactnn.cli", *argv, "--plugin", "sigterm_hook", *extra],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def nn_model(tmp_path):
    sys.path.insert(0, str(tmp_path))
    try:
        import sigterm_factory

        return sigterm_factory.make()
    finally:
        sys.path.remove(str(tmp_path))


def _terminate_when_ready(proc: subprocess.Popen, ready) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training never reached its second epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_sigterm_cleans_up_like_ctrl_c_and_exits_143(tmp_path):
    proc = _train(tmp_path)
    code, err = _terminate_when_ready(proc, tmp_path / "ready")
    assert code == 143, err
    assert err.splitlines()[-1] == "terminated (SIGTERM)"
    assert "Traceback" not in err
    assert not (tmp_path / "out.training.jsonl").exists()  # a plain rerun is not refused
    assert not (tmp_path / "out").exists()


def test_sigterm_keeps_the_log_a_checkpoint_resumes(tmp_path):
    proc = _train(tmp_path, "--checkpoint-dir", "ckpt")
    code, err = _terminate_when_ready(proc, tmp_path / "ready")
    assert code == 143, err
    assert "training log kept: out.training.jsonl (the same command resumes" in err
    assert (tmp_path / "out.training.jsonl").read_text().count("\n") == 1  # epoch 1 logged
