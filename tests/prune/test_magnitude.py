import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.magnitude import MagnitudeConfig
from compactnn.prune.masks import sparsity_of
from compactnn.recipe import resolve_recipe
from tests.prune._collapse import collapse_warnings


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_sp50_zeroes_the_smallest_half_of_each_layer_and_leaves_input_alone():
    model = _mlp()
    before = [p.clone() for p in model.parameters()]
    pruned = compactnn.compress(model, "sp50", progress=False)
    for name in ("0", "2"):
        w0 = model.get_submodule(name).weight
        w = pruned.get_submodule(name).weight
        assert int((w == 0).sum()) == w.numel() // 2
        kept = w0.abs()[w != 0].min()
        assert kept >= w0.abs()[w == 0].max()  # nothing kept is smaller than a pruned weight
        assert torch.equal(w[w != 0], w0[w != 0])
        assert not torch.signbit(w[w == 0]).any()  # +0.0: stored as zeros by the artifact
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_global_scope_reaches_the_total_sparsity():
    pruned = compactnn.compress(_mlp(), "sp90-global", progress=False)
    nnz, total = sparsity_of(pruned)
    assert nnz == total - round(0.9 * total)


def test_short_names_build_the_magnitude_step():
    assert resolve_recipe("sp50").steps[0].config == MagnitudeConfig(sparsity=0.5)
    step = resolve_recipe("sp60-global").steps[0]
    assert step.method == "magnitude"
    assert step.config == MagnitudeConfig(sparsity=0.6, scope="global")
    assert resolve_recipe("sp50-magnitude").steps[0].config == MagnitudeConfig(sparsity=0.5)


def test_percent_out_of_range_is_refused():
    with pytest.raises(CompactnnError, match=r"100% is outside \[1, 100\)"):
        resolve_recipe("sp100")


def test_global_scope_never_zeroes_a_whole_layer_and_warns_naming_it():
    torch.manual_seed(0)  # default init: layer 2's weights are the smallest of the three
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    x = torch.randn(64, 64)
    with pytest.warns(UserWarning, match=r"whole output rows of 2 \(all 64 of 64 rows\)"):
        pruned = compactnn.compress(model, "sp95-global", calib_data=x, progress=False)
    for name in ("0", "2", "4"):  # the floor: every output row keeps its largest weight
        w = pruned.get_submodule(name).weight
        assert ((w != 0).sum(1) >= 1).all()
    assert pruned[2].weight.abs().argmax(1).equal(model[2].weight.abs().argmax(1))
    nnz, total = sparsity_of(pruned)
    assert nnz == total - round(0.95 * total)  # the budget is still exact
    out = pruned(x)
    assert not torch.allclose(out, out[:1].expand_as(out))  # the output depends on the input
    assert "2 (all 64 of 64 rows)" in " ".join(compactnn.info_of(pruned)["notes"])


def test_one_shot_magnitude_that_changes_many_predictions_warns_with_the_drop():
    # a random MLP: sp50 changes ~22% of its predictions without collapsing it, which the
    # fine-tuned flows' 50% bar let pass; one-shot warns below 90% agreement, as nm does
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    found, _, want, got = collapse_warnings(net, x, "magnitude", MagnitudeConfig(sparsity=0.5))
    agree = float((got == want).float().mean())  # by hand, from both models' outputs
    assert 0.5 <= agree < 0.9 and len(got.unique()) == len(want.unique()) > 1  # the premise
    assert len(found) == 1, found
    assert found[0].startswith("magnitude step (sparsity 0.5, one-shot, no fine-tuning)")
    assert f"agrees with the float model's on {agree:.1%} of the 64" in found[0]
    assert f"top-1 may fall by up to {100 * (1 - agree):.1f} points" in found[0]
    assert "sp50-gradual or sp50-dns" in found[0]
    found, _, want, got = collapse_warnings(net, x, "magnitude", MagnitudeConfig(sparsity=0.1))
    assert float((got == want).float().mean()) >= 0.9 and found == []  # healthy: silent
