"""PE-wise structured pruning with ternarization: masks, ternary codes, schedule, artifact."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.pewise import (
    PEWiseConfig,
    PEWiseWeight,
    default_ramp_share,
    float_epochs,
    group_norms,
    masked_ternary,
    pe_group_mask,
    ramp_epochs,
    scheduled_sparsity,
    ternary_threshold,
    wpc_candidates,
    wpc_penalty_grad,
)
from compactnn.quant.base import short_weight_spec
from compactnn.recipe import Recipe, Step
from compactnn.registry import SHORT_NAMES

# a 2 x 4 weight in (1, 2) tiles: norms [[5, 1], [1, sqrt 2]] (a tie at 1)
W_TIE = torch.tensor([[3.0, 4.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
# hand example for the ternary codes (tile norms [[.906, .943], [.206, .671]])
W_TERN = torch.tensor([[0.9, -0.1, 0.5, -0.8], [0.05, 0.2, -0.6, 0.3]])


def test_group_norms_and_mask_by_hand_with_ties():
    torch.testing.assert_close(
        group_norms(W_TIE, (1, 2)), torch.tensor([[5.0, 1.0], [1.0, 2**0.5]])
    )
    # one tile of four: the tie at norm 1 goes to the lower row-major index, tile (0, 1)
    expect = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(pe_group_mask(W_TIE, (1, 2), 0.25), expect)
    # two tiles: both tied tiles
    expect = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert torch.equal(pe_group_mask(W_TIE, (1, 2), 0.5), expect)
    # a (2, 4) tile is the whole weight: one group, sparsity 0.4 rounds to 0 of 1
    assert torch.equal(pe_group_mask(W_TIE, (2, 4), 0.4), torch.ones(2, 4))


def test_conv_tiles_take_the_whole_kernel_window():
    w = torch.zeros(2, 2, 2, 2)  # (O, I, kh, kw), tiles (1, 1): one per (o, i) pair
    w[0, 0] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # norm 2
    w[0, 1, 0, 0] = 3.0  # norm 3
    w[1, 0, 1, 1] = -0.5  # norm 0.5
    w[1, 1] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # norm sqrt 2
    torch.testing.assert_close(group_norms(w, (1, 1)), torch.tensor([[2.0, 3.0], [0.5, 2**0.5]]))
    mask = pe_group_mask(w, (1, 1), 0.5)
    keep = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert torch.equal(mask, keep[:, :, None, None].expand(2, 2, 2, 2))


def test_ternary_codes_of_the_kept_weights_match_the_closed_form():
    mask = pe_group_mask(W_TERN, (1, 2), 0.25)  # prunes tile (1, 0)
    assert torch.equal(mask, torch.tensor([[1.0, 1, 1, 1], [0, 0, 1, 1]]))
    codes, alpha = masked_ternary(W_TERN, mask, 0.7)
    # kept |w|: .9 .1 .5 .8 .6 .3 -> delta = 0.7 * 3.2 / 6 = 0.3733; above: .9 .5 .8 .6
    assert torch.equal(codes, torch.tensor([[1.0, 0, 1, -1], [0, 0, -1, 0]]))
    torch.testing.assert_close(alpha, torch.tensor((0.9 + 0.5 + 0.8 + 0.6) / 4))
    # statistics of row 0 only: delta = 0.7 * 2.3 / 4 = 0.4025; alpha over row 0's codes
    stats = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]])
    codes, alpha = masked_ternary(W_TERN, mask, 0.7, stats)
    assert torch.equal(codes, torch.tensor([[1.0, 0, 1, -1], [0, 0, -1, 0]]))
    torch.testing.assert_close(alpha, torch.tensor((0.9 + 0.5 + 0.8) / 3))
    w = W_TERN.clone()
    w[1, 3] = 0.39  # all kept: delta = 0.7 * 3.29 / 6 = 0.3838 -> code 1; row 0: 0.4025 -> 0
    assert masked_ternary(w, mask, 0.7)[0][1, 3] == 1
    assert masked_ternary(w, mask, 0.7, stats)[0][1, 3] == 0


def test_schedule_values():
    cfg = PEWiseConfig(sparsity=0.8, ramp_share=1 / 3)  # 6 epochs, ramp 1/3 -> 2 epochs
    assert scheduled_sparsity(0, 6, cfg) == pytest.approx(0.8 * (1 - 0.5**3))
    assert scheduled_sparsity(1, 6, cfg) == scheduled_sparsity(5, 6, cfg) == pytest.approx(0.8)
    assert float_epochs(6, cfg) == 0
    assert float_epochs(6, PEWiseConfig(schedule="sequential", ramp_share=1 / 3)) == 3
    assert float_epochs(6, PEWiseConfig(schedule="sequential")) == 4  # the default ramp: 4
    # joint's default ramp: 1/3 + 2 s / 3 of the epochs: 4 of 6 at 50%, 5 at 75%
    assert ramp_epochs(6, PEWiseConfig()) == 4
    assert ramp_epochs(6, PEWiseConfig(sparsity=0.75)) == 5
    assert ramp_epochs(12, PEWiseConfig(sparsity=0.25)) == 6
    assert default_ramp_share(PEWiseConfig(sparsity=0.9)) == pytest.approx(0.9333333)
    assert ramp_epochs(6, PEWiseConfig(sparsity=0.75, schedule="sequential")) == 4
    assert scheduled_sparsity(2, 6, PEWiseConfig(sparsity=0.5)) == pytest.approx(0.5 * 0.984375)
    assert scheduled_sparsity(3, 6, PEWiseConfig(sparsity=0.5)) == 0.5  # ramp of 4 epochs
    assert float_epochs(1, PEWiseConfig(schedule="sequential")) == 0


def test_quantizer_phases_gradient_and_monotone_mask():
    torch.manual_seed(0)
    w = torch.randn(4, 8, requires_grad=True)
    cfg = PEWiseConfig(group=(1, 4), sparsity=0.5, schedule="sequential", ramp_share=1 / 3)
    q = PEWiseWeight(w.detach(), short_weight_spec(2), cfg)
    q.start_epoch(w.detach(), 0, 6)  # 0.4375 of 8 tiles -> 4 (round half up of 3.5)
    assert q.float_phase and int((group_norms(q.mask, (1, 4)) == 0).sum()) == 4
    out = q(w)
    assert torch.equal(out, w.detach() * q.mask)
    out.sum().backward()
    assert torch.equal(w.grad, q.mask)  # pruned tiles get no gradient
    before = q.mask.clone()
    q.start_epoch(w.detach(), 3, 6)  # quantized phase, final sparsity: still 4 tiles
    assert not q.float_phase and torch.equal(q.mask, before)
    codes, alpha = masked_ternary(w, q.mask, 0.7)
    torch.testing.assert_close(q(w), alpha * codes)


def test_frozen_phase_keeps_the_threshold_of_its_first_step():
    torch.manual_seed(2)
    w = torch.randn(4, 8)
    cfg = PEWiseConfig(group=(1, 4), sparsity=0.5, freeze_epochs=2, ramp_share=5 / 6)
    assert ramp_epochs(6, cfg) == 4  # the ramp (5 of 6 epochs) ends before the frozen two
    assert ramp_epochs(6, PEWiseConfig(freeze_epochs=1, ramp_share=5 / 6)) == 5
    q = PEWiseWeight(w, short_weight_spec(2), cfg)
    q.start_epoch(w, 0, 6)
    assert q.frozen() is None
    q.start_epoch(w, 4, 6)  # the frozen phase starts at the final mask (4 of 8 tiles)
    assert int((group_norms(q.mask, (1, 4)) == 0).sum()) == 4
    kept = (w.abs() * q.mask)[q.mask > 0]
    delta = 0.7 * kept.mean()  # TWN's threshold of the kept weights, by hand
    torch.testing.assert_close(q.delta, delta)
    w2 = w * 1.5 + 0.1  # the weights move on; the threshold does not
    q.start_epoch(w2, 5, 6)
    torch.testing.assert_close(q.delta, delta)
    codes = torch.sign(w2) * (w2.abs() > delta) * q.mask
    alpha = w2.abs()[codes != 0].mean()
    torch.testing.assert_close(q(w2), alpha * codes)
    assert torch.equal(q.export(w2).codes.float(), codes)
    assert not torch.equal(masked_ternary(w2, q.mask, 0.7)[0], codes)  # unfrozen: differs
    torch.testing.assert_close(ternary_threshold(w2, q.mask), 0.7 * (w2.abs() * q.mask).sum() / 16)
    q.start_epoch(w2, 0, 6)  # a new run: unfrozen again
    assert q.frozen() is None
    with pytest.raises(CompactnnError, match="freeze_epochs"):
        PEWiseConfig(freeze_epochs=-1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize(("schedule", "freeze"), [("joint", 0), ("sequential", 0), ("joint", 1)])
def test_trained_tiles_are_zero_and_stay_zero_after_save_load(schedule, freeze, tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    cfg = PEWiseConfig(
        epochs=2, batch_size=16, schedule=schedule, sparsity=0.5, freeze_epochs=freeze
    )
    q = compactnn.train(model, Recipe("pe", (Step("pe", cfg),)), (x, y), progress=False)
    for name, n_tiles in (("c2", 16), ("c3", 32)):  # first and last layers: 8-bit, dense
        layer = q.get_submodule(name)
        zero_tiles = group_norms(layer.weight_codes.float(), (1, 8)) == 0
        assert int(zero_tiles.sum()) >= math.floor(0.5 * n_tiles + 0.5)
        assert set(layer.weight_codes.unique().tolist()) <= {-1, 0, 1}
        assert torch.all(group_norms(layer.weight, (1, 8))[zero_tiles] == 0)
    compactnn.save(q, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a", model=_Net())
    for name in ("c2", "c3"):
        assert torch.equal(loaded.get_submodule(name).weight, q.get_submodule(name).weight)
    assert torch.equal(loaded(x), q(x))


def test_bad_inputs_are_named():
    with pytest.raises(CompactnnError, match="group"):
        PEWiseConfig(group=(0, 8))
    with pytest.raises(CompactnnError, match="sparsity"):
        PEWiseConfig(sparsity=1.0)
    with pytest.raises(CompactnnError, match="schedule"):
        PEWiseConfig(schedule="both")
    with pytest.raises(CompactnnError, match="2 bits"):
        PEWiseConfig(weight=short_weight_spec(4))
    with pytest.raises(CompactnnError, match=r"\(1, 3\) must divide"):
        pe_group_mask(torch.ones(2, 4), (1, 3), 0.5)


def test_short_names():
    (rule,) = [r for r in SHORT_NAMES if r.form.startswith("w<2|8>[a<A>]-pe")]
    (step,) = rule.build(rule.pattern.fullmatch("w2a8-pe75-seq")).steps
    assert (step.config.sparsity, step.config.schedule, step.config.act.bits) == (
        0.75,
        "sequential",
        8,
    )
    (step,) = rule.build(rule.pattern.fullmatch("w2-pe50")).steps
    assert step.config.act is None and step.config.schedule == "joint"
    assert step.config == PEWiseConfig(act=None)


def test_wpc_gradient_matches_autograd_of_the_group_penalty():
    torch.manual_seed(1)
    w = torch.randn(4, 8, requires_grad=True)
    cfg = PEWiseConfig(group=(1, 4), sparsity=0.75, wpc=0.01, ramp_share=2 / 3)  # ramp 4
    q = PEWiseWeight(w.detach(), short_weight_spec(2), cfg)
    q.start_epoch(w.detach(), 0, 6)  # 0.75 * (1 - 0.75**3) = 0.434 of 8 tiles -> 3 pruned
    assert q.penalize and int((group_norms(q.mask, (1, 4)) == 0).sum()) == 3
    # candidates: the kept tiles that the final 75% (6 of 8) would prune, by hand
    norms = group_norms(w.detach() * q.mask, (1, 4)).reshape(-1)
    kept = torch.nonzero(norms > 0).reshape(-1)
    cand = kept[torch.argsort(norms[kept])[:3]]
    tiles = torch.zeros(8)
    tiles[cand] = 1.0
    cmask = tiles.reshape(4, 2).repeat_interleave(4, 1)
    assert torch.equal(wpc_candidates(w, q.mask, (1, 4), 0.75), cmask)
    q.train()
    g = torch.randn(4, 8)
    (q(w) * g).sum().backward()
    # reference: autograd of  <w_hat, g>  (STE: gradient g * m)  +  lambda sum_C ||W_g||_2
    ref = w.detach().clone().requires_grad_(True)
    pen = sum(
        (ref * cmask).reshape(4, 2, 4)[r, c].norm()
        for r, c in ((t // 2, t % 2) for t in cand.tolist())
    )
    (0.01 * pen + (ref * q.mask * g).sum()).backward()
    torch.testing.assert_close(w.grad, ref.grad)
    torch.testing.assert_close(wpc_penalty_grad(w, cmask, (1, 4), 0.01), ref.grad - q.mask * g)
    # at the final sparsity the candidates are the pruned tiles: no penalty any more
    q.start_epoch(w.detach(), 3, 6)
    assert not q.penalize and not wpc_candidates(w, q.mask, (1, 4), 0.75).any()
    with pytest.raises(CompactnnError, match="wpc"):
        PEWiseConfig(wpc=-1.0)


def test_a_layer_the_group_does_not_fit_is_refused_by_name_and_the_fix_works():
    """A depthwise conv (one input channel per group) cannot take (1, 8) tiles: the error
    names the ``nn.Sequential`` layer, and the ``targets`` it suggests then trains."""
    import re

    import yaml

    def net():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 3),
        )  # fmt: skip

    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    with pytest.raises(CompactnnError) as err:
        compactnn.train(net(), "w2a8-pe50", (x, y), epochs=1, progress=False)
    text = str(err.value)
    assert text.startswith("layer '2' with weight shape (16, 1, 3, 3) has 16 output and 1 input")
    assert "--ignore 2 (compactnn compress/train), ignore=['2'] (compress/train" in text
    fix = yaml.safe_load(re.search(r"targets: (\{.*\})\.$", text).group(1))
    assert fix == {"ignore": ["2"]}
    recipe = yaml.safe_load(compactnn.resolve_recipe("w2a8-pe50").to_yaml())
    recipe["steps"][0]["targets"] = {**recipe["steps"][0].get("targets", {}), **fix}
    q = compactnn.train(net(), Recipe.from_yaml(yaml.safe_dump(recipe)), (x, y), epochs=1,
                        progress=False)  # fmt: skip
    assert isinstance(q[2], nn.Conv2d)  # left float
    assert set(q[4].weight_codes.unique().tolist()) <= {-1, 0, 1}  # the others ternary


def test_short_name_percent_and_bits_get_range_messages():
    (rule,) = [r for r in SHORT_NAMES if r.form.startswith("w<2|8>[a<A>]-pe")]
    with pytest.raises(CompactnnError) as err:
        rule.build(rule.pattern.fullmatch("w2a8-pe100"))
    assert str(err.value) == (
        "recipe 'w2a8-pe100': the share of PE tiles pruned, 100%, must lie in [0, 100), "
        "e.g. w2a8-pe50 (half the tiles) or w2a8-pe75."
    )
    with pytest.raises(CompactnnError, match=r"2 bits \(ternary, w2a8-pe\) or 8 bits .*not 4"):
        rule.build(rule.pattern.fullmatch("w4a8-pe50"))
