"""FSDP2 against DDP and one process: ``w4a4-lsq`` on mnist-cnn (docs/scale.md, "FSDP2").

Three runs of the same recipe, seed and global batch, each in fresh processes (a torchrun
environment, gloo on CPU, 1 thread per process): one process, two processes with DDP, two
with FSDP2. Reported: final top-1 of the returned model, wall time, the parameter bytes each
rank holds once the student is wrapped (FSDP2: its shards; DDP and one process: the whole
student), peak resident memory of rank 0, and whether the saved artifacts of the DDP and
FSDP2 runs are byte-identical.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

from compactnn.bench.scale import marked, spawn_ranks

_MARK = "FSDP_RESULT "

SCRIPT = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
import compactnn
from compactnn.data.mnist import load_mnist
from compactnn.models import load_reference
from compactnn.training import distributed, fsdp

held = {}
_wrap = distributed.wrap
def wrap(env, model):  # record what this rank holds once the student is wrapped
    out = _wrap(env, model)
    held.update(fsdp.local_bytes(model))
    return out
distributed.wrap = wrap
epochs, strategy, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ref = load_reference("mnist-cnn", progress=False)
t0 = time.perf_counter()
q = compactnn.train(ref.model, "w4a4-lsq", load_mnist(), epochs=epochs, progress=False,
                    distributed=strategy)
seconds = time.perf_counter() - t0
import torch.distributed as dist
rank = dist.get_rank() if dist.is_initialized() else 0
if rank == 0:
    compactnn.save(q, out)
    print("FSDP_RESULT " + json.dumps({
        "seconds": round(seconds, 1), "top1": round(ref.evaluate(q), 2),
        "param_bytes": held.get("params"),
        "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }), flush=True)
"""


def _run(world: int, strategy: str, epochs: int, out: Path) -> dict:
    result: dict = {}
    for code, text in spawn_ranks(world, [SCRIPT, str(epochs), strategy, str(out)]):
        result = marked(text, _MARK) or result
        if code:
            result.setdefault("error", f"exit {code}")
    return result


def run(quick: bool = False) -> str:
    """Markdown: one process, DDP and FSDP2 on two processes (see the module docstring)."""
    epochs = 1 if quick else 4
    root = Path(tempfile.mkdtemp(prefix="compactnn-fsdp-"))
    try:
        runs = {
            "1 process": _run(1, "ddp", epochs, root / "single"),
            "2 processes, DDP": _run(2, "ddp", epochs, root / "ddp"),
            "2 processes, FSDP2": _run(2, "fsdp2", epochs, root / "fsdp2"),
        }
        names = ("model.safetensors", "recipe.yaml", "compactnn.json")
        try:
            same = all(
                filecmp.cmp(root / "ddp" / n, root / "fsdp2" / n, shallow=False) for n in names
            )
        except OSError:
            same = None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        f"## FSDP2: `w4a4-lsq` on mnist-cnn, {epochs} epoch(s), seed 0",
        "",
        "Same recipe, seed and global batch (64); 1 torch thread per process; gloo on CPU; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| run | top-1 % | wall s | parameter bytes per rank | peak RSS rank 0 (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        rows.append(
            f"| {name} | {r.get('top1', '-')} | {r.get('seconds', '-')} | "
            f"{r.get('param_bytes', '-')} | {r.get('maxrss_mib', '-')} |"
        )
    one, fs = runs["1 process"], runs["2 processes, FSDP2"]
    if "top1" in one and "top1" in fs:
        gap = abs(one["top1"] - fs["top1"])
        verdict = "met" if gap <= 0.3 else "**not met**"
        rows += ["", f"FSDP2 against one process: {gap:.2f} points (target <= 0.3): {verdict}."]
    if one.get("param_bytes") and fs.get("param_bytes"):
        rows.append(
            f"FSDP2 parameter bytes per rank / whole: {fs['param_bytes'] / one['param_bytes']:.3f}."
        )
    rows.append(f"DDP and FSDP2 artifacts byte-identical: {same}.")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
