"""PE-wise pruning through ``compress`` records what it pruned as the other pruning steps do
(each pruned layer's share of zero weights, the parameter, non-zero and MAC counts), and
warns, as they do, when the pruned model's outputs have collapsed."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.prune.pewise import PEWiseConfig, group_norms, pe_group_mask
from compactnn.prune.stats import count_macs
from compactnn.prune.train import ONE_SHOT_AGREEMENT
from compactnn.recipe import resolve_recipe
from tests.prune._collapse import collapse_warnings

GROUP = (1, 8)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 8),
    )  # fmt: skip


def _x(n=64):
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.filterwarnings("ignore:pe step")
@pytest.mark.parametrize("recipe", ["w8a8-pe50", "w2a8-pe50"])
def test_the_pruned_layers_and_counts_are_recorded(recipe):
    net, x = _cnn(), _x(16)
    q = compactnn.compress(net, recipe, calib_data=x, progress=False)
    record = compactnn.info_of(q)["extra"]["pruning"]["pe"]
    layers = {k for k, v in record.items() if isinstance(v, float)}
    assert layers == {"2", "4"}  # the interior layers; the first and last are never pruned
    zeroed = 0
    for name in layers:
        w = q.get_submodule(name).weight.detach()
        assert record[name] == round(float((w == 0).float().mean()), 4)  # counted by hand
        tiles = group_norms(w, GROUP) == 0
        assert int(tiles.sum()) == round(0.5 * tiles.numel())  # half the tiles
        zeroed += int((w == 0).sum()) - int((net.get_submodule(name).weight == 0).sum())
    params = sum(p.numel() for p in net.parameters())
    nonzero = sum(int((p != 0).sum()) for p in net.parameters())
    macs = count_macs(net, x)
    assert record["params"] == {"before": params, "after": params}  # tiles zeroed, not removed
    assert record["nonzero"] == {"before": nonzero, "after": nonzero - zeroed}
    assert record["macs"] == {"before": macs, "after": macs}  # dense kernels multiply zeros
    assert record["tiles"] == {"group": list(GROUP), "sparsity": 0.5}


def test_without_calibration_data_only_the_layers_are_recorded():
    q = compactnn.compress(_cnn(), "w2-pe50", progress=False)
    record = compactnn.info_of(q)["extra"]["pruning"]["pe"]
    assert set(record) == {"2", "4", "tiles"}


def _agreement(want, got):
    return float((want == got).float().mean())


def test_a_collapsed_pe_model_is_warned_about():
    """Ternary weights on 90% of the tiles, untrained: the argmax moves on most samples."""
    config = PEWiseConfig(sparsity=0.9)
    found, _q, want, got = collapse_warnings(_cnn(), _x(), "pe", config)
    assert _agreement(want, got) < ONE_SHOT_AGREEMENT  # the independent check
    assert len(found) == 1, found
    assert found[0].startswith("pe step (90% of the 1x8 PE tiles, w2a8, calibrated, not trained)")
    assert "compactnn.train" in found[0] and "w2a8-pe" in found[0]


def _already_pruned():
    """Half the (1, 8) tiles of each interior layer already zero (those PE-wise pruning
    takes), the first conv's weights of one magnitude (exact on its 8-bit grid), no biases."""
    net = _cnn()
    with torch.no_grad():
        net[0].weight.copy_(net[0].weight.sign() * 0.3)
        for i in (2, 4):
            net[i].weight.mul_(pe_group_mask(net[i].weight, GROUP, 0.5))
        for m in net:
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return net


def test_a_pe_model_that_kept_its_outputs_is_not_warned_about():
    config = resolve_recipe("w8-pe50").steps[0].config
    found, _q, want, got = collapse_warnings(_already_pruned(), _x(), "pe", config)
    assert _agreement(want, got) >= ONE_SHOT_AGREEMENT
    assert found == []
