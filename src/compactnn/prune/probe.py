"""Probe Pruning (Le et al., ICLR 2025): batch-wise dynamic structured pruning of LLaMA MLPs.

For every batch, a small *probe* (the ``probe`` fraction of the batch's tokens with the
largest hidden-state norm, the paper's residual-importance selection) runs through the MLP's
input projections first. Its intermediate states ``h = act(gate(x_p)) * up(x_p)``
``(P, H)`` give each hidden channel ``j`` a fresh squared norm, blended with the historical
one gathered on calibration data:

    m_j = (1 - history) * mean_p h_pj^2 + history * mean_calib h_j^2
    I_j = ||W_down[:, j]||_2 * sqrt(m_j)

(structured Wanda-style importance, the paper's PPsp with our simple blend: the paper's
exact integration rule was not available to us). The ``ratio`` of channels with the lowest
``I_j`` is skipped for the whole batch: the MLP runs on sliced weights, so its matrix
products are really that much smaller (``down(act(gate_k(x)) * up_k(x))`` with ``k`` the
kept channels). ``probe=0`` is the static baseline: calibration statistics only, the same
channels for every batch (structured Wanda).

Scope: LLaMA-style MLPs (``mlp.{gate,up,down}_proj`` with ``act_fn``); attention heads are
not probed. The probe-pruned model runs in eager PyTorch (``deploy``/``to_kernels`` do not
take it). Layers quantized weight-only keep their codes: the slices read their dequantized
weights.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.core.modules import set_module
from compactnn.errors import CompactnnError
from compactnn.prune.shortnames import percent_fraction
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_artifact_hook, register_short_name

EXTRA_KEY = "probe_prune"


@dataclasses.dataclass(frozen=True)
class ProbePruneConfig(MethodConfig):
    """Probe Pruning settings.

    Args:
        ratio: fraction of each MLP's hidden channels skipped per batch, in [0, 1).
        probe: fraction of a batch's tokens used as the probe, in [0, 1]; 0 means static
            pruning from the calibration statistics alone.
        history: weight of the calibration statistics in the blended score, in [0, 1].
    """

    ratio: float = 0.3
    probe: float = 0.05
    history: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ratio < 1.0:
            raise CompactnnError(f"ratio={self.ratio} must lie in [0, 1); e.g. 0.3.")
        if not 0.0 <= self.probe <= 1.0:
            raise CompactnnError(f"probe={self.probe} must lie in [0, 1]; e.g. 0.05.")
        if not 0.0 <= self.history <= 1.0:
            raise CompactnnError(f"history={self.history} must lie in [0, 1]; e.g. 0.5.")
        if self.probe == 0.0 and self.history == 0.0:
            raise CompactnnError("probe=0 and history=0 leave no statistics: raise either.")


def probe_rows(x2d: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``ceil(fraction * N)`` rows of ``x2d`` ``(N, C)`` with the largest L2 norm.

    Example:
        >>> probe_rows(torch.tensor([[1.0], [3.0], [2.0]]), 0.5).tolist()
        [1, 2]
    """
    k = max(1, math.ceil(fraction * x2d.shape[0]))
    return torch.topk(x2d.norm(dim=1), k).indices.sort().values


def channel_importance(
    down_weight: torch.Tensor, sq_mean: torch.Tensor, hist_sq_mean: torch.Tensor, history: float
) -> torch.Tensor:
    """``I_j = ||W_down[:, j]|| * sqrt((1 - history) * sq_mean_j + history * hist_j)`` ``(H,)``."""
    blended = (1.0 - history) * sq_mean + history * hist_sq_mean
    return down_weight.norm(dim=0) * blended.clamp(min=0).sqrt()


def kept_channels(importance: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sorted indices of the channels kept when skipping ``floor(ratio * H)`` of the lowest."""
    drop = min(math.floor(ratio * importance.numel()), importance.numel() - 1)
    keep = torch.topk(importance, importance.numel() - drop, sorted=False).indices
    return keep.sort().values


def _linear(layer: nn.Linear, x: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
    """``layer(x)`` restricted to output ``rows`` or input ``cols`` (weights sliced, not masked)."""
    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is not None:
        x = quantizer(x)
    w, b = layer.weight, layer.bias
    if rows is not None:
        w = w.index_select(0, rows)
        b = None if b is None else b.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    return F.linear(x, w, b)


class ProbeMLP(nn.Module):
    """A LLaMA MLP that skips its least important hidden channels, chosen per batch.

    Keeps the original ``gate_proj``/``up_proj``/``down_proj`` children (names unchanged, so
    artifacts keep their tensor names) and the historical statistics as a buffer.
    """

    def __init__(self, mlp: nn.Module, hist_sq_mean: torch.Tensor, config: ProbePruneConfig):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.register_buffer("hist_sq_mean", hist_sq_mean.detach().float().clone())
        self.config = config
        self.last_kept: torch.Tensor | None = None  # channels of the last batch, for tests

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        cfg = self.config
        if cfg.probe > 0:
            x2d = x.reshape(-1, x.shape[-1])
            xp = x2d.index_select(0, probe_rows(x2d, cfg.probe))  # (P, C)
            hp = self.act_fn(self.gate_proj(xp)) * self.up_proj(xp)  # (P, H)
            sq = hp.float().pow(2).mean(0)
        else:
            sq = torch.zeros_like(self.hist_sq_mean)
        history = cfg.history if cfg.probe > 0 else 1.0
        score = channel_importance(self.down_proj.weight.float(), sq, self.hist_sq_mean, history)
        keep = kept_channels(score, cfg.ratio)
        self.last_kept = keep
        h = self.act_fn(_linear(self.gate_proj, x, rows=keep)) * _linear(self.up_proj, x, keep)
        return _linear(self.down_proj, h, cols=keep)


def llama_mlps(model: nn.Module, targets: dict[str, nn.Module]) -> list[str]:
    """Names of the LLaMA-style MLPs whose three projections are all among ``targets``."""
    found = []
    for name, m in model.named_modules():
        parts = ("gate_proj", "up_proj", "down_proj")
        if all(isinstance(getattr(m, p, None), nn.Linear) for p in parts) and hasattr(m, "act_fn"):
            if all(f"{name}.{p}" in targets for p in parts):
                found.append(name)
    return found


def _hist_sq_means(model: nn.Module, mlps: list[str], ctx: CompressContext) -> dict:
    """Mean squared input of each MLP's ``down_proj`` per channel ``(H,)`` on calibration data."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, args) -> None:
        h = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sums[name] = sums.get(name, 0) + h.pow(2).sum(0)
        counts[name] = counts.get(name, 0) + h.shape[0]

    handles = [
        model.get_submodule(f"{n}.down_proj").register_forward_pre_hook(
            lambda _m, a, n=n: hook(n, a)
        )
        for n in mlps
    ]
    try:
        with torch.no_grad():
            ctx.run_all(model, desc="probe pruning statistics")
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in mlps}


@register("probe", ProbePruneConfig, "Probe Pruning: per-batch dynamic MLP channel skipping")
def apply_probe(
    model: nn.Module, targets: dict[str, nn.Module], config: ProbePruneConfig, ctx: CompressContext
) -> nn.Module:
    """Gather calibration statistics, then wrap every targeted LLaMA MLP in a ProbeMLP."""
    ctx.require_calibration("probe", 32)
    mlps = llama_mlps(model, targets)
    if not mlps:
        raise CompactnnError(
            "probe pruning needs LLaMA-style MLPs (mlp.gate_proj/up_proj/down_proj with act_fn) "
            "among the step's targets; for other models use channel pruning (e.g. 'ch30')."
        )
    hist = _hist_sq_means(model, mlps, ctx)
    for name in mlps:
        set_module(model, name, ProbeMLP(model.get_submodule(name), hist[name], config))
    # the statistics travel as the wrappers' float buffers; the header names the wrappers
    ctx.extra[EXTRA_KEY] = {"config": config.to_dict(), "mlps": mlps}
    mode = "static (calibration only)" if config.probe == 0 else f"probe {config.probe:.0%}"
    ctx.notes.append(
        f"probe pruning: {len(mlps)} MLPs skip {config.ratio:.0%} of their channels per batch "
        f"({mode})"
    )
    return model


@register_artifact_hook("before_layers")
def restore_probe_mlps(model: nn.Module, extra: dict) -> None:
    """At ``load``: wrap the recorded MLPs again; their statistics load as float state."""
    saved = extra.get(EXTRA_KEY)
    if not saved:
        return
    config = ProbePruneConfig.from_dict(saved["config"], "probe_prune.config")
    for name in saved["mlps"]:
        mlp = model.get_submodule(name)
        hist = torch.zeros(mlp.down_proj.in_features)  # overwritten by the artifact's buffer
        set_module(model, name, ProbeMLP(mlp, hist, config))


@register_short_name(r"pp(?P<p>\d+)(?P<static>-static)?", "pp<P>[-static]", ("pp30", "pp30-static"))
def _short_name(m: re.Match[str]) -> Recipe:
    ratio = percent_fraction(m["p"], m.string)
    config = (
        ProbePruneConfig(ratio=ratio, probe=0.0, history=1.0)
        if m["static"]
        else (ProbePruneConfig(ratio=ratio))
    )
    return Recipe(m.string, (Step("probe", config),))
