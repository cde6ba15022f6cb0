import dataclasses
import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.modules import Targets
from compactnn.errors import CompactnnError
from compactnn.prune.dns import DNSConfig
from compactnn.prune.gradual import GradualConfig
from compactnn.prune.magnitude import MagnitudeConfig
from compactnn.prune.masks import masks_from_scores, nm_mask
from compactnn.recipe import Recipe, Step


def test_layer_scope_prunes_exact_count_of_smallest():
    scores = {"a": torch.arange(10.0), "b": torch.arange(20.0).flip(0)}
    masks = masks_from_scores(scores, 0.3, "layer")
    assert masks["a"].tolist() == [0, 0, 0] + [1] * 7
    assert int(masks["b"].sum()) == 14 and masks["b"][-6:].sum() == 0


def test_global_scope_ranks_all_layers_together():
    scores = {"small": torch.full((10,), 0.1), "large": torch.full((10,), 5.0)}
    masks = masks_from_scores(scores, 0.5, "global")
    assert masks["small"].sum() == 0 and masks["large"].sum() == 10


def test_nm_mask_keeps_n_largest_of_each_group():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert nm_mask(s, 2, 4).tolist() == [[1, 0, 1, 0, 0, 1, 1, 0]]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_refused(bad):
    with pytest.raises(CompactnnError, match=r"outside \[0, 1\)"):
        MagnitudeConfig(sparsity=bad)


def test_global_floor_keeps_a_weight_in_every_row_with_the_total_exact():
    torch.manual_seed(0)
    scores = {"big": torch.rand(8, 16) + 1.0, "small": torch.rand(4, 16) * 0.01}
    with pytest.warns(UserWarning, match=r"small \(all 4 of 4 rows\)"):
        masks = masks_from_scores(scores, 0.8, "global")
    assert (masks["small"].sum(1) >= 1).all() and (masks["big"].sum(1) >= 1).all()
    kept = masks["small"].argmax(1)
    assert torch.equal(kept, scores["small"].argmax(1))  # each row keeps its best entry
    assert int(sum(m.sum() for m in masks.values())) == 192 - round(0.8 * 192)


class _TiedLM(nn.Module):
    """A token table and an LM head sharing its weight (GPT-2's tie_word_embeddings)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(48, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 48, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


TIED_STEPS = {
    "sp50": "magnitude",
    "nm2:4": "nm",
    "sp50-wanda": "wanda",
    "sp50-sparsegpt": "sparsegpt",
    "gradual": "gradual",
    "dns": "dns",
}


def _tied_recipe(name):
    if name == "gradual":
        config = GradualConfig(final_sparsity=0.5, end_step=2, frequency=1, finetune_steps=0)
        return Recipe("gradual", (Step("gradual", config),))
    if name == "dns":
        config = DNSConfig(sparsity=0.5, surgery_steps=2, finetune_steps=0)
        return Recipe("dns", (Step("dns", config),))
    return name


@pytest.mark.parametrize("recipe", list(TIED_STEPS))
def test_a_tied_head_is_left_dense_with_its_reason(recipe):
    model = _TiedLM().eval()
    ids = torch.randint(0, 48, (64, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = compactnn.compress(model, _tied_recipe(recipe), calib_data=ids, progress=False)
    assert q.head.weight is q.emb.weight  # still tied
    assert (q.emb.weight != 0).all()  # the embedding is not pruned (gradual, dns train it)
    assert recipe in ("gradual", "dns") or torch.equal(q.emb.weight, model.emb.weight)
    assert (q.fc.weight == 0).any()  # the rest is pruned
    tied = [str(w.message) for w in caught if "tied" in str(w.message)]
    assert len(tied) == 1 and "head" in tied[0] and "emb" in tied[0]
    reason = compactnn.info_of(q)["float_layers"]["head"]
    assert reason == "tied to emb: pruning it would prune the embedding"
    assert "head" not in compactnn.info_of(q)["extra"]["pruning"][TIED_STEPS[recipe]]


def test_targeting_the_table_too_prunes_the_tied_pair_once():
    targets = Targets(classes=("Linear", "Embedding"))
    recipe = Recipe("sp50-tied", (Step("magnitude", MagnitudeConfig(sparsity=0.5), targets),))
    model = _TiedLM().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tie warning: the user asked for both
        q = compactnn.compress(model, recipe, progress=False)
    assert q.head.weight is q.emb.weight
    assert int((q.emb.weight == 0).sum()) == q.emb.weight.numel() // 2
    info = compactnn.info_of(q)
    assert {"emb", "head"}.isdisjoint(info["float_layers"])  # pruned: not left in float


def _quantize_then_prune(names: list[str]) -> Recipe:
    from compactnn.quant.rtn import RTNConfig

    rtn = dataclasses.replace(RTNConfig.from_short(4, None, None), first_last_bits=None)
    quantize = Step("rtn", rtn, Targets(names=tuple(names)))
    return Recipe("w4-then-sp90", (quantize, Step("magnitude", MagnitudeConfig(sparsity=0.9))))


def test_a_pruning_step_after_quantizing_every_layer_is_refused():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CompactnnError) as exc:
        compactnn.compress(model, _quantize_then_prune(["*"]), calib_data=x, progress=False)
    assert str(exc.value) == (
        "the pruning step would prune nothing: every layer it targets (0, 2) is already "
        "quantized by an earlier step; put the pruning step before the quantization step in "
        "the recipe (prune, then quantize)."
    )


def test_a_pruning_step_skips_the_quantized_layers_and_prunes_the_rest():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"^0: already quantized; prune before quantizing"):
        q = compactnn.compress(model, _quantize_then_prune(["0"]), calib_data=x, progress=False)
    assert int((q[2].weight == 0).sum()) == round(0.9 * 64)  # the float layer was pruned


def test_channel_pruning_after_quantizing_every_layer_is_refused_too():
    """w4 then ch50 warned per layer and pruned no channel."""
    from compactnn.prune.channel import ChannelConfig
    from compactnn.quant.rtn import RTNConfig

    rtn = dataclasses.replace(RTNConfig.from_short(4, None, None), first_last_bits=None)
    recipe = Recipe("w4-then-ch50", (Step("rtn", rtn), Step("channel", ChannelConfig(ratio=0.5))))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CompactnnError, match="would prune nothing: every layer it targets"):
        compactnn.compress(model, recipe, calib_data=x, progress=False)
