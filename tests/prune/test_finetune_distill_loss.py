"""``prune.train.finetune`` with a loss that needs the inputs (``DistillationLoss``, or any
``(outputs, inputs, labels)`` callable): it is called with them, and the zeros stay."""

import copy

import torch
from torch import nn

import compactnn
from compactnn.distill import DistillationLoss, kd_loss
from compactnn.prune.train import finetune


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(64, 8)
    y = model(x).argmax(1).detach()
    sparse = compactnn.compress(model, "sp50", progress=False)
    return model, sparse, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def test_distillation_loss_trains_towards_the_teacher_and_keeps_the_zeros():
    teacher, sparse, loader = _setup()
    zeros = sparse[0].weight == 0
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        before = float(kd_loss(sparse(x), teacher(x), 4.0))
    finetune(sparse, loader, epochs=20, lr=1e-2, loss_fn=DistillationLoss(teacher, weight=1.0))
    with torch.no_grad():
        after = float(kd_loss(sparse(x), teacher(x), 4.0))
    assert after < 0.5 * before  # it distilled (was: TypeError, forward() missing 'labels')
    assert torch.equal(sparse[0].weight == 0, zeros)


def test_a_three_argument_loss_gets_the_batch_inputs():
    _, sparse, loader = _setup()
    seen = []

    def loss(out, x, y):
        seen.append(x)
        return nn.functional.cross_entropy(out, y)

    finetune(copy.deepcopy(sparse), loader, loss_fn=loss)
    assert len(seen) == 4 and all(s is b[0] for s, b in zip(seen, loader, strict=True))
