"""compactnn.train on two processes (gloo, CPU) equals the single-process run."""

from __future__ import annotations

from pathlib import Path

import torch

from compactnn.training.distributed import detect, rank_slice
from tests.training._ranks import run_ranks

# The same script runs single-process and under a torchrun-like environment (RANK, ...).
SCRIPT = r"""
import atexit, dataclasses, sys, torch
import torch.distributed as dist
# registered before train() joins the group: runs after compactnn's own exit handler
atexit.register(lambda: open(sys.argv[1] + ".exit", "w").write(str(dist.is_initialized())))
from torch import nn
import compactnn
from compactnn.recipe import Recipe, Step, resolve_recipe
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
g = torch.Generator().manual_seed(1)
x = torch.randn(96, 12, generator=g)
y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
step = resolve_recipe("w4a4-lsq").steps[0]
config = dataclasses.replace(step.config, batch_size=32, epochs=2, lr=1e-2)
recipe = Recipe("w4a4-lsq", [Step(step.method, config, step.targets)])
q = compactnn.train(model, recipe, (x, y), seed=0, progress=False, checkpoint_dir=sys.argv[2])
with torch.no_grad():
    out = q(x)
torch.save({"out": out, "state": q.state_dict(), "history": q._compactnn["extra"]["training"]},
           sys.argv[1])
"""


def _run(tmp: Path, world: int) -> list[dict]:
    outs = [tmp / f"w{world}-r{rank}.pt" for rank in range(world)]
    run_ranks(SCRIPT, world, lambda rank: [str(outs[rank]), str(tmp / f"ckpt{world}")], 120)
    return [torch.load(out, weights_only=True) for out in outs]


def test_rank_slices_cover_the_batch_once():
    for n, world in [(10, 3), (32, 2), (5, 4)]:
        idx = torch.arange(n)
        parts = [idx[rank_slice(n, world, r)] for r in range(world)]
        assert torch.equal(torch.cat(parts), idx)
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_single_process_environment():
    env = detect()
    assert (env.world_size, env.rank, env.device.type) == (1, 0, "cpu")


def test_two_processes_match_single_process(tmp_path):
    single = _run(tmp_path, 1)[0]
    ranks = _run(tmp_path, 2)
    a, b = ranks
    for key in a["state"]:  # both ranks end with identical weights, bit for bit
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert a["history"] == b["history"]
    # Same global batch (32 = 2 x 16), same lr: DDP's mean of the two slices' mean gradients
    # is the global batch's mean gradient; only float summation order differs.
    scale = single["out"].abs().max()
    assert (a["out"] - single["out"]).abs().max() <= 1e-3 * scale
    assert a["history"]["steps"] == single["history"]["steps"] == 6
    assert abs(a["history"]["loss"][-1] - single["history"]["loss"][-1]) < 1e-3
    # the group train() joined is destroyed before the interpreter finalizes (not by gloo's
    # threads during finalization, which can abort a run that succeeded)
    for rank in range(2):
        assert (tmp_path / f"w2-r{rank}.pt.exit").read_text() == "False"
    # rank 0 alone wrote the checkpoint
    assert (tmp_path / "ckpt2" / "qat-checkpoint.pt").is_file()
