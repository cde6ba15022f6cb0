"""The commands of docs/own-model.md, run in order in the current directory.

Trains a torchvision ResNet-18 (adapted to 1-channel 8x8 images) for one epoch on
scikit-learn's 8x8 digits, saves it as safetensors with a factory in ``digitnet.py``,
compresses it three ways with ``compactnn compress``, evaluates with labels, deploys the w8a8
artifact on int8 kernels and writes the report with ``compactnn report``.

Run it from an empty directory (about 2 minutes on 2 cores)::

    # CLI commands run in this process: set the wait policy `compactnn` sets for itself
    OMP_WAIT_POLICY=PASSIVE python docs/own_model_tutorial.py
    python docs/own_model_tutorial.py --subprocess  # each as a real `compactnn` process

Example:
    >>> main(["--no-progress"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

FACTORY = '''"""My model: torchvision's ResNet-18 for 1-channel 8x8 images and 10 classes."""

import torchvision
from torch import nn


def build() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()  # 8x8 inputs: keep the resolution for layer1
    return model
'''
RECIPES = ("w8a8", "w4a8", "sp50")
SEED, THREADS, EPOCHS, BATCH, LR = 0, 2, 1, 64, 1e-3
MODEL = "digitnet:build --weights digitnet.safetensors"


def train_and_save() -> float:
    """Step 1: train the float model, save weights and data; returns its test top-1 (%)."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from compactnn.data import load_digits8

    Path("digitnet.py").write_text(FACTORY)
    sys.path.insert(0, str(Path.cwd()))
    sys.modules.pop("digitnet", None)
    import digitnet

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    split = load_digits8()  # x: (N, 1, 8, 8) float32, y: (N,) int64
    model = digitnet.build()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for _ in range(EPOCHS):
        for start in range(0, len(split.y_train), BATCH):
            x = split.x_train[start : start + BATCH]
            loss = nn.functional.cross_entropy(model(x), split.y_train[start : start + BATCH])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    save_file(model.state_dict(), "digitnet.safetensors")
    save_file({"x": split.x_train[:128].contiguous()}, "calib.safetensors")
    save_file({"x": split.x_test.contiguous(), "y": split.y_test}, "test.safetensors")
    with torch.no_grad():
        top1 = 100.0 * int((model(split.x_test).argmax(1) == split.y_test).sum())
    return top1 / len(split.y_test)


def commands(progress: bool) -> list[str]:
    """Steps 2-5: the shell commands of the tutorial, in order."""
    flag = "" if progress else " --no-progress"
    cmds = [
        f"compactnn compress {MODEL} --recipe {r} --data calib.safetensors --out art/{r}{flag}"
        for r in RECIPES
    ]
    cmds.append(f"compactnn eval art/w8a8 --model {MODEL} --data test.safetensors{flag}")
    cmds.append(f"compactnn deploy art/w8a8 --model {MODEL} --data test.safetensors{flag}")
    arts = " ".join(f"art/{r}" for r in RECIPES)
    cmds.append(
        f"compactnn report {arts} --model {MODEL} --data test.safetensors --out report"
        f" --no-memory{flag}"  # the resident memory column: a few minutes more on 2 cores
    )
    return cmds


def run_command(cmd: str, in_process: bool) -> None:
    """Run one ``compactnn ...`` line; stop on a non-zero exit status."""
    print(f"\n$ {cmd}", flush=True)
    argv = shlex.split(cmd)[1:]
    if in_process:
        from compactnn.cli import main as cli_main

        status = cli_main(argv)
    else:
        status = subprocess.run([sys.executable, "-m", "compactnn.cli", *argv]).returncode
    if status != 0:
        raise SystemExit(f"`{cmd}` failed with exit status {status}")


def main(argv: list[str] | None = None) -> int:
    """Run the whole tutorial in the current directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subprocess", action="store_true", help="run each CLI command apart")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    print(f"float top-1 after {EPOCHS} epoch: {train_and_save():.2f}%")
    for cmd in commands(progress=not args.no_progress):
        run_command(cmd, in_process=not args.subprocess)
    return 0


if __name__ == "__main__":
    sys.exit(main())
