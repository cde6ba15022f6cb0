"""Probe Pruning on short inputs (a 1-token decode step with a KV cache): no probe, so no call
costs more than the dense MLP, and the history read is that of the step's own position."""

import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

import compactnn
from compactnn.models.tiny_hf import tiny_model
from compactnn.prune.probe import (
    ProbeMLP,
    ProbePruneConfig,
    channel_importance,
    kept_channels,
    probe_flops_fraction,
    probe_pays,
)


def _flops(fn, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(x)
    return counter.get_total_flops()


def _static_keep(mlp, hist_row: torch.Tensor) -> torch.Tensor:
    w = mlp.down_proj.weight.detach().float()
    return kept_channels(channel_importance(w, hist_row, "ppsp"), 0.3)


def test_a_one_token_step_runs_no_probe_and_costs_less_than_dense():
    torch.manual_seed(0)
    model, _ = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    hidden = mlp.down_proj.in_features
    g = torch.rand(10, hidden) + 0.1  # a different history per position
    probe = ProbeMLP(mlp, g, ProbePruneConfig())
    x = torch.randn(1, 1, mlp.gate_proj.in_features)
    probe.catch_positions(model.model.layers[0], (), {"position_ids": torch.tensor([[7]])})
    pruned = _flops(probe, x)
    dense = _flops(mlp, x)
    kept = hidden - int(0.3 * hidden)
    assert pruned == dense * kept // hidden  # the sliced MLP alone: no probe products
    assert probe.last_probe is None
    assert probe.last_kept.tolist() == _static_keep(mlp, g[7]).tolist()  # position 7's history
    assert not probe_pays(ProbePruneConfig(), 1, 1) and probe_pays(ProbePruneConfig(), 1, 5)
    assert probe_flops_fraction(ProbePruneConfig(), 4, 1) == 0.0


def test_generate_decode_steps_use_their_own_positions_history():
    model, calib = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration samples
        pruned = compactnn.compress(model, "pp30", calib_data=calib, progress=False).eval()
    mlp = pruned.model.layers[1].mlp
    ids = calib[0]["input_ids"][:1]
    prefix = 5
    assert mlp.hist_sq.shape[0] > prefix + 1
    cache = DynamicCache(config=pruned.config)
    with torch.no_grad():
        pruned(ids[:, :prefix], cache=cache, use_cache=True)
        assert mlp.last_probe is not None  # the prompt is long enough to probe
        pruned(ids[:, prefix : prefix + 1], cache=cache, use_cache=True)
    assert mlp.last_probe is None
    assert mlp.last_kept.tolist() == _static_keep(mlp, mlp.hist_sq[prefix]).tolist()
    assert mlp.last_kept.tolist() != _static_keep(mlp, mlp.hist_sq[0]).tolist()
