import torch
from torch import nn
from torch.nn.utils import parametrize

from compactnn.core.calib import as_batches
from compactnn.core.context import CompressContext
from compactnn.engines.prune_schedule import (
    ScheduledPruner,
    prune_while_distilling,
    weight_layer_names,
)
from compactnn.prune.masks import set_mask


class EveryOther(ScheduledPruner):
    """Zeroes one more input column of every layer at each even step."""

    def __init__(self, model, names=None):
        super().__init__(model, names)
        self.seen = []
        self.update(0)

    def update(self, step):
        self.seen.append(step)
        if step % 2 == 0:
            for n in self.names:
                mask = self.mask(n).clone()
                mask[:, : step // 2 + 1] = 0.0
                set_mask(self.model, n, mask)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Conv1d(1, 1, 1), nn.Linear(8, 3))


def test_default_names_are_the_weight_layers_and_step_calls_the_hook():
    model = _model()
    assert weight_layer_names(model) == ["0", "2", "3"]
    pruner = EveryOther(model, ["0", "3"])
    for _ in range(4):
        pruner.step()
    assert pruner.seen == [0, 1, 2, 3, 4] and pruner.t == 4
    assert torch.equal(model[0].weight[:, :3], torch.zeros(8, 3))  # masked: exact zeros
    pruner.finish()
    assert not parametrize.is_parametrized(model[0], "weight")  # plain weights again
    assert (model[0].weight[:, :3] == 0).all() and (model[3].weight[:, :3] == 0).all()


def test_prune_while_distilling_runs_the_schedule_and_bakes_the_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = as_batches([torch.randn(16, 6) for _ in range(4)])
    ctx = CompressContext(batches=batches, progress=False)
    targets = dict(model.named_children())
    pruner = prune_while_distilling(model, targets, ctx, EveryOther, 5, 1e-3, "test")
    assert pruner.names == ["0", "2"] and pruner.seen == [0, 1, 2, 3, 4, 5]
    assert not parametrize.is_parametrized(model[0], "weight")
    assert (model[0].weight[:, :3] == 0).all()
