"""TSQ under DistributedDataParallel (two gloo processes, CPU): the ranks solve the ternary
weights from the Gram of the whole global batch, so they stay identical and match the
single-process run; a run resumed inside the Gram epoch is the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.training._ranks import run_ranks

# The same script runs single-process and under a torchrun-like environment (RANK, ...).
SCRIPT = r"""
import sys, torch
from torch import nn
import compactnn
from compactnn.quant.tsq import TSQConfig
from compactnn.recipe import Recipe, Step
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
    nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3),
)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(96, 1, 6, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
# epoch 1 learns codes, epoch 2 (steps 4-6) collects the Gram, epoch 3 starts with the solve
cfg = TSQConfig(epochs=3, code_epochs=2, batch_size=32, distill=0.0)
recipe = Recipe("w2a2-tsq", (Step("tsq", cfg),))
stop = int(sys.argv[3]) or None
q = compactnn.train(model, recipe, (x, y), seed=0, progress=False, checkpoint_dir=sys.argv[2],
                    max_steps=stop)
with torch.no_grad():
    out = q(x)
torch.save({"out": out, "state": q.state_dict()}, sys.argv[1])
"""


def _run(tmp: Path, world: int, name: str, ckpt: str, stop: int = 0) -> list[dict]:
    outs = [tmp / f"{name}-r{rank}.pt" for rank in range(world)]
    run_ranks(SCRIPT, world, lambda rank: [str(outs[rank]), str(tmp / ckpt), str(stop)])
    return [torch.load(out, weights_only=True) for out in outs]


def _same_state(a: dict, b: dict) -> None:
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key


def test_tsq_ranks_solve_the_global_gram_and_resume_exactly(tmp_path):
    single = _run(tmp_path, 1, "single", "ck-single")[0]
    a, b = _run(tmp_path, 2, "ddp", "ck-ddp")
    _same_state(a, b)  # both ranks solved the same system: identical, bit for bit
    assert torch.equal(a["out"], b["out"])
    # the two-process run is the single-process run up to float summation order
    for key in ("2.weight_scale", "4.weight_scale"):  # alpha of the two solved ternary layers
        assert torch.allclose(a["state"][key], single["state"][key], rtol=2e-3), key
        assert torch.equal(a["state"][key.replace("scale", "codes")],
                           single["state"][key.replace("scale", "codes")])  # fmt: skip
    scale = single["out"].abs().max()
    assert (a["out"] - single["out"]).abs().max() <= 1e-3 * scale
    # stopped inside the Gram epoch (rank 0 alone writes the checkpoint), then resumed
    _run(tmp_path, 2, "stopped", "ck-resume", stop=5)
    r0, r1 = _run(tmp_path, 2, "resumed", "ck-resume")
    _same_state(r0, a)
    _same_state(r1, a)
    assert torch.equal(r0["out"], a["out"])
