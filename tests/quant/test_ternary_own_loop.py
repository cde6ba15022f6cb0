"""TTQ and TWN in the docs' "your own loop" flow: the trained model in eval mode computes
exactly what the frozen model (the artifact) computes, as LSQ and the binary methods do
(T2 finding 9: the training forward kept float32 scales, the artifact float16 ones)."""

import pytest
import torch
from torch import nn

from compactnn.training import freeze, prepare_qat


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("recipe", ["w2a8-ttq", "w2a8-twn"])
def test_eval_mode_training_forward_equals_the_frozen_model(recipe):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    qat = prepare_qat(_net(), recipe, x, progress=False)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    qat.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(qat(x), y).backward()
        opt.step()
    qat.eval()
    with torch.no_grad():
        ref = qat(x)
        out = freeze(qat).eval()(x)
    assert torch.equal(out, ref), (out - ref).abs().max().item()
