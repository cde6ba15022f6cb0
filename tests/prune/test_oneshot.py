"""Wanda and SparseGPT against magnitude pruning on a layer with outlier input features."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.nm import holds_nm
from compactnn.prune.sparsegpt import SparseGPTConfig, sparsegpt_prune


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
