"""Wanda and SparseGPT against magnitude pruning on a layer with outlier input features."""

import re

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.nm import holds_nm
from compactnn.prune.sparsegpt import SparseGPTConfig, sparsegpt_prune
from compactnn.prune.wanda import WandaConfig
from compactnn.recipe import resolve_recipe
from tests.prune._collapse import collapse_warnings


def _setup():
    torch.manual_seed(0)
    # inputs with a few large-magnitude features (as in transformer activations) and
    # correlated columns, so that |w| alone is a poor importance measure
    base = torch.randn(512, 8)
    mix = torch.randn(8, 32)
    scale = torch.ones(32)
    scale[:4] = 20.0
    x = (base @ mix + 0.3 * torch.randn(512, 32)) * scale
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    return model, x


def _err(model, pruned, x):
    with torch.no_grad():
        return float(((model(x) - pruned(x)) ** 2).mean())


@pytest.mark.parametrize("suffix", ["", "-wanda", "-sparsegpt"])
def test_half_of_each_row_or_block_is_pruned(suffix):
    model, x = _setup()
    pruned = compactnn.compress(model, f"sp50{suffix}", calib_data=x, progress=False)
    assert int((pruned[0].weight == 0).sum()) == 16 * 32 // 2


def test_wanda_and_sparsegpt_beat_magnitude_on_output_error():
    model, x = _setup()
    errs = {
        r: _err(model, compactnn.compress(model, r, calib_data=x, progress=False), x)
        for r in ("sp50", "sp50-wanda", "sp50-sparsegpt")
    }
    assert errs["sp50-wanda"] < 0.5 * errs["sp50"]
    assert errs["sp50-sparsegpt"] < errs["sp50-wanda"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_n_m_patterns_hold(method):
    model, x = _setup()
    pruned = compactnn.compress(model, f"nm2:4-{method}", calib_data=x, progress=False)
    w = pruned[0].weight
    assert holds_nm(w, 2, 4) and int((w == 0).sum()) == w.numel() // 2


def test_sparsegpt_without_pruning_keeps_weights():
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    x = torch.randn(100, 8)
    h = 2 / 100 * x.double().T @ x.double()
    out = sparsegpt_prune(w, h, SparseGPTConfig(sparsity=0.0))
    assert torch.allclose(out.float(), w, atol=1e-6)


def test_needs_calibration_data():
    model, _ = _setup()
    with pytest.raises(CompactnnError, match="calibration data"):
        compactnn.compress(model, "sp50-wanda", progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_n_m_forms_keep_a_layer_m_does_not_divide_dense_with_a_warning(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)
    ).eval()
    x = torch.randn(64, 1, 8, 8)
    with pytest.warns(UserWarning, match=rf"{method} 2:4: kept dense .*: 0 \(9 inputs\)"):
        pruned = compactnn.compress(model, f"nm2:4-{method}", calib_data=x, progress=False)
    assert torch.equal(pruned[0].weight, model[0].weight)
    assert holds_nm(pruned[2].weight, 2, 4) and holds_nm(pruned[4].weight, 2, 4)
    reason = f"{method} 2:4 kept it dense (input size 9 not divisible by M)"
    assert compactnn.info_of(pruned)["float_layers"] == {"0": reason}
    with pytest.raises(CompactnnError, match=r"M=4 divides the input size of none .*0 \(10 inputs"):
        compactnn.compress(
            nn.Sequential(nn.Linear(10, 8)), f"nm2:4-{method}", calib_data=torch.randn(64, 10)
        )


def _mlp_and_data():
    """A random MLP (4 classes) and 64 calibration samples."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return net, torch.randn(64, 16, generator=torch.Generator().manual_seed(2))


def _short_names(msg: str) -> list[str]:
    """The short names a message suggests (sp<P>..., nm<N>:<M>...)."""
    return re.findall(r"\b(?:sp\d+|nm\d+:\d+)(?:-[a-z]+)?\b", msg)


@pytest.mark.parametrize(
    "method,config,remedy",
    [
        ("wanda", WandaConfig(n=2, m=4), "nm2:4-ft"),
        ("sparsegpt", SparseGPTConfig(n=2, m=4), "nm2:4-ft"),
        ("wanda", WandaConfig(sparsity=0.5), "sp50-gradual"),
        ("sparsegpt", SparseGPTConfig(sparsity=0.7), "sp70-gradual"),
    ],
)
def test_one_shot_result_that_changes_many_predictions_warns_with_the_drop_and_a_remedy(
    method, config, remedy
):
    net, x = _mlp_and_data()
    found, pruned, want, got = collapse_warnings(net, x, method, config)
    agree = float((got == want).float().mean())  # by hand, from both models' outputs
    assert 0.5 <= agree < 0.9 and len(got.unique()) > 1  # the premise: drifted, not collapsed
    assert len(found) == 1, found
    msg = found[0]
    assert msg.startswith(f"{method} step (") and "one-shot, no fine-tuning" in msg
    assert f"agrees with the float model's on {agree:.1%} of the 64 calibration samples" in msg
    assert f"top-1 may fall by up to {100 * (1 - agree):.1f} points" in msg
    assert remedy in msg and "compactnn.prune.train.finetune" in msg
    for name in _short_names(msg):  # every remedy named is a recipe that exists
        assert resolve_recipe(name).steps, name
    assert msg in compactnn.info_of(pruned)["notes"]


@pytest.mark.parametrize(
    "method,config",
    [("wanda", WandaConfig(sparsity=0.1)), ("sparsegpt", SparseGPTConfig(sparsity=0.3))],
)
def test_healthy_one_shot_result_does_not_warn(method, config):
    net, x = _mlp_and_data()
    found, _, want, got = collapse_warnings(net, x, method, config)
    assert float((got == want).float().mean()) >= 0.9  # the premise, by hand
    assert found == []
