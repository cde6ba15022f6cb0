import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.context import CompressContext
from compactnn.prune.dns import DNSConfig
from compactnn.prune.gradual import GradualConfig
from compactnn.prune.train import collapse_reason, output_summary


def _summary_by_hand(outs):
    """Independent reference: argmax classes and mean per-feature std of stacked outputs."""
    y = torch.cat(outs).double()
    return set(y.argmax(-1).unique().tolist()), float(y.std(0).mean())


def test_output_summary_matches_stacked_outputs():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    batches = [torch.randn(7, 5), torch.randn(3, 5)]
    got = output_summary(model, CompressContext(batches=batches))
    with torch.no_grad():
        classes, spread = _summary_by_hand([model(b) for b in batches])
    assert got["classes"] == classes and got["samples"] == 10
    with torch.no_grad():
        assert torch.equal(got["argmax"], torch.cat([model(b).argmax(1) for b in batches]))
    assert abs(got["spread"] - spread) < 1e-9 * spread


def test_collapse_reason_flags_one_class_and_a_vanished_spread():
    float_ = {"classes": {0, 1, 2}, "spread": 2.0, "samples": 8, "argmax": None}
    assert collapse_reason(float_, float_) is None
    one = collapse_reason({"classes": {2}, "spread": 1.0, "samples": 8}, float_)
    assert "class 2 for all 8" in one and "3 classes" in one and "spread" not in one
    flat = collapse_reason({"classes": {0, 1}, "spread": 0.02, "samples": 8}, float_)
    assert "1.0% of the float model's" in flat
    # a float model that itself answers one class (or a regression output) is no reference
    assert (
        collapse_reason({"classes": {0}, "spread": 1.0, "samples": 8}, {**float_, "classes": {0}})
        is None
    )


def test_collapse_reason_flags_an_argmax_that_left_the_float_model():
    want = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    float_ = {"classes": {0, 1, 2}, "spread": 2.0, "samples": 8, "argmax": want}
    half = want.clone()
    half[:4] = (half[:4] + 1) % 3  # 4 of 8 differ: 50% agreement is not flagged
    assert collapse_reason({**float_, "argmax": half}, float_) is None
    half[4] = (half[4] + 1) % 3  # 3 of 8 agree
    reason = collapse_reason({**float_, "argmax": half}, float_)
    assert reason == (
        "its argmax agrees with the float model's on 37.5% of the 8 calibration samples "
        "(top-1 may fall by up to 62.5 points)"  # 5 of 8 changed: the most top-1 can lose
    )
    # a stricter bar (one-shot steps) flags 7 of 8 agreeing, not 8 of 8
    seven = want.clone()
    seven[0] = 1
    assert "87.5% of the 8" in collapse_reason({**float_, "argmax": seven}, float_, 0.9)
    assert collapse_reason(float_, float_, 0.9) is None


def _fragile_net():
    """Its output depends on inputs 0..16 only through 17 small first-layer weights, which
    a 90% cut removes (it keeps the 3 largest, which see only zero inputs)."""
    net = nn.Sequential(nn.Linear(20, 1), nn.ReLU(), nn.Linear(1, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.linspace(0.01, 0.05, 20).unsqueeze(0))
        net[0].bias.fill_(1.0)
        net[2].weight.copy_(torch.tensor([[1.0], [0.0], [-0.9]]))
        net[2].bias.copy_(torch.tensor([-1.5, 0.0, 1.2]))
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(0)) * 10
    x[:, 17:] = 0.0
    return net.eval(), x


def _compress(config, method):
    net, x = _fragile_net()
    recipe = compactnn.Recipe(method, (compactnn.Step(method, config),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compactnn.compress(net, recipe, calib_data=x, progress=False)
    with torch.no_grad():
        classes = (len(torch.unique(net(x).argmax(1))), len(torch.unique(out(x).argmax(1))))
    return [str(w.message) for w in caught if "collapsed" in str(w.message)], classes


@pytest.mark.parametrize(
    "method,config,words",
    [
        ("dns", DNSConfig(sparsity=0.9, surgery_steps=2, finetune_steps=2, lr=1e-6), "sp45-dns"),
        (
            "gradual",
            GradualConfig(final_sparsity=0.9, end_step=2, finetune_steps=2, lr=1e-6),
            "sp45-gradual",
        ),
    ],
)
def test_collapsed_pruned_model_warns_with_the_way_out(method, config, words):
    found, (float_classes, pruned_classes) = _compress(config, method)
    assert float_classes > 1 and pruned_classes == 1  # the premise, measured
    assert len(found) == 1, found
    msg = found[0]
    assert msg.startswith(f"{method} step") and "sparsity 0.9" in msg and "lr 1e-06" in msg
    assert "for all 64 calibration samples" in msg and "spread" in msg
    assert words in msg and "YAML recipe" in msg and "compactnn.prune.train.finetune" in msg


def test_a_healthy_pruned_model_does_not_warn():
    found, (_, pruned_classes) = _compress(
        DNSConfig(sparsity=0.5, surgery_steps=2, finetune_steps=2, lr=1e-6), "dns"
    )
    assert pruned_classes > 1 and found == []


def test_one_shot_magnitude_pruning_warns_too_when_data_is_given():
    from compactnn.prune.magnitude import MagnitudeConfig

    found, (float_classes, pruned_classes) = _compress(MagnitudeConfig(sparsity=0.9), "magnitude")
    assert float_classes > 1 and pruned_classes == 1  # the premise, measured
    assert len(found) == 1 and found[0].startswith("magnitude step (sparsity 0.9, one-shot")
    assert "sp45" in found[0] and "sp90-gradual" in found[0]
    # one-shot warns below 90% agreement: 0.3 changes 11% of this net's predictions, 0.1 6%
    assert _compress(MagnitudeConfig(sparsity=0.1), "magnitude")[0] == []
