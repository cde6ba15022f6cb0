"""Probe Pruning (Le et al., ICLR 2025): dynamic structured pruning of LLaMA MLPs.

For every batch ``x`` ``(B, T, C)`` entering an MLP, a small *probe* picks which hidden
channels to skip, in the paper's four steps:

1. **Probe selection**: a few positions (the ``tokens`` fraction of ``T``) and, batch-wise,
   a few samples. ``select="residual"`` is the paper's residual importance: with ``r`` the
   block's residual stream (the input of the layer norm feeding the MLP) and
   ``n_bt = ||r_bt||_2``, the positions with the largest ``||n_:t||_2`` (per sample:
   ``n_bt``), position 0 always kept in short probes. ``select="stride"`` (default) takes
   evenly spaced positions ``round(linspace(0, T - 1, P))``: on ``tiny-lm`` the largest-norm
   tokens are outliers whose states mislead the score. Batch-wise, the ``samples`` fraction
   with the largest ``||n_b,probe||_2`` joins the probe (the paper's batch ranking).
2. The probe runs through the gate and up projections: ``h = act(gate(x_p)) * up(x_p)``.
3. **Importance-scaled fusion** with the historical states, per position ``t`` and channel
   ``j`` (``g_tj``: mean of ``h_tj^2`` over the calibration windows at position ``t``;
   ``p_tj``: mean of ``h_tj^2`` over the probe's samples)::

       w_tj = p_tj / (p_tj + g_tj)              (the larger state gets the larger weight)
       m_j  = sum_{t in probe} (1 - w_tj) * g_tj + w_tj * p_tj

   ``history`` set to a number replaces ``1 - w_tj`` by that fixed weight.
4. **The PPsp score** and the cut: ``I_j = m_j * ||W_down[:, j]^2||_2`` (the squared weights'
   column norm; ``score="wanda"``: structured Wanda ``sqrt(m_j) * ||W_down[:, j]||_2``); the
   ``ratio`` lowest channels are skipped: the MLP runs on **sliced weights**, so its
   products really shrink (``down(act(gate_k(x)) * up_k(x))``).

``mode="sample"`` (default) makes one probe and one channel set per sample of the batch
(a batch of 32 unrelated windows has no channel set good for all: one set per batch is
close to static there); ``mode="batch"`` is the paper's batch-wise rule (one set for the
whole batch); ``mode="static"`` scores from the calibration statistics alone (the same
channels for every batch: structured Wanda with ``score="wanda"``). The probe costs
``2 P C H`` multiply-adds per probed token set against ``3 N C H`` for the dense MLP:
:func:`probe_flops_fraction`. An input too short for the probe to pay for itself (its cost
above the ``ratio`` of the products it skips: with the defaults, fewer than 5 positions, such
as every 1-token decode step of ``generate`` with a KV cache) is not probed: its channels
come from the historical states of its positions alone (the static rule), so no call costs
more than the dense MLP (:func:`probe_pays`).

Positions are the model's ``position_ids`` (caught from the decoder layer's call), so a
decode step at position ``t`` reads the history of position ``t``, not of position 0; without
them a window's positions are ``0..T-1``. On a padded batch the top model's ``attention_mask``
(a pre-hook) keeps the probe and the history on real tokens: :mod:`compactnn.prune.probe_mask`.

Scope: LLaMA-style MLPs (``mlp.{gate,up,down}_proj`` with ``act_fn``); attention heads are
not probed; residuals are read from the sibling ``post_attention_layernorm`` when there is
one (else the MLP input's norms rank the tokens). The probe-pruned model runs in eager
PyTorch: ``deploy`` does not take it, and ``to_kernels`` keeps the ``ProbeMLP`` as it is.
Layers quantized weight-only keep their codes: the slices read their dequantized weights.
The channel choice of a window uses all its positions (like the paper's prefill): it is not
causal.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import torch
from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.core.modules import set_module
from compactnn.errors import CompactnnError
from compactnn.prune.masks import check_removes_some
from compactnn.prune.probe_mask import (
    mask_positions,
    masked_sample_mean,
    real_tokens,
    sample_probes,
)
from compactnn.prune.probe_slices import cols_per_sample, rows_per_sample, sliced_linear
from compactnn.prune.shortnames import percent_fraction
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_artifact_hook, register_short_name

EXTRA_KEY = "probe_prune"
SCORES = ("ppsp", "wanda")
MODES = ("sample", "batch", "static")
SELECTS = ("stride", "residual")
NORM_NAME = "post_attention_layernorm"


@dataclasses.dataclass(frozen=True)
class ProbePruneConfig(MethodConfig):
    """Probe Pruning settings.

    Args:
        ratio: fraction of each MLP's hidden channels skipped, in [0, 1).
        mode: ``"sample"`` (a probe and a channel set per sample), ``"batch"`` (the paper's
            one set per batch) or ``"static"`` (calibration statistics only, no probe).
        tokens: fraction of the sequence positions in the probe, in (0, 1].
        samples: ``mode="batch"``: fraction of the batch's samples in the probe, in (0, 1].
        select: how the probe's positions are chosen: ``"stride"`` (evenly spaced) or
            ``"residual"`` (largest residual norm, the paper's rule).
        history: ``None`` for the paper's importance-scaled fusion, or a fixed weight of the
            historical states in [0, 1].
        score: ``"ppsp"`` (the paper's ``m_j ||W_j^2||``) or ``"wanda"`` (``sqrt(m_j) ||W_j||``).
    """

    needs_calibration: ClassVar[bool] = True

    ratio: float = 0.3
    mode: str = "sample"
    tokens: float = 0.15
    samples: float = 0.05
    select: str = "stride"
    history: float | None = None
    score: str = "ppsp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ratio < 1.0:
            raise CompactnnError(f"ratio={self.ratio} must lie in [0, 1); e.g. 0.3.")
        check_removes_some(self.ratio, "ProbePruneConfig(ratio=0)", "channels", "ratio=0.3 (pp30)")
        for name, allowed in (("mode", MODES), ("select", SELECTS), ("score", SCORES)):
            if getattr(self, name) not in allowed:
                raise CompactnnError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        if not 0.0 < self.tokens <= 1.0:
            raise CompactnnError(f"tokens={self.tokens} must lie in (0, 1]; e.g. 0.15.")
        if not 0.0 < self.samples <= 1.0:
            raise CompactnnError(f"samples={self.samples} must lie in (0, 1]; e.g. 0.05.")
        if self.history is not None and not 0.0 <= self.history <= 1.0:
            raise CompactnnError(f"history={self.history} must be None or lie in [0, 1].")

    @property
    def needs_residual(self) -> bool:
        """True when the probe ranks samples or positions by the residual's norm."""
        return self.mode == "batch" or (self.mode == "sample" and self.select == "residual")


def n_positions(t: int, tokens: float) -> int:
    """Positions in a probe of a ``t``-token sequence: ``min(t, max(2, ceil(tokens * t)))``."""
    return min(t, max(2, math.ceil(tokens * t)))


def top_positions(norms: torch.Tensor, n_pos: int) -> torch.Tensor:
    """Per row of ``norms`` ``(R, T)``, its ``n_pos`` largest positions, sorted ``(R, n_pos)``.

    Position 0 (the attention sink) replaces the earliest pick when at most 10 are chosen.

    Example:
        >>> top_positions(torch.tensor([[1.0, 5.0, 4.0, 9.0]]), 2).tolist()
        [[0, 3]]
    """
    pos = torch.topk(norms, n_pos, dim=1).indices.sort(dim=1).values
    if n_pos <= 10 and n_pos < norms.shape[1]:
        pos[:, 0] = 0  # sorted: 0 is either already first or replaces the earliest pick
    return pos


def stride_positions(t: int, n_pos: int) -> torch.Tensor:
    """``n_pos`` evenly spaced positions of ``0..t-1``, both ends included.

    Example:
        >>> stride_positions(10, 4).tolist()
        [0, 3, 6, 9]
    """
    return torch.linspace(0, t - 1, n_pos).round().long().unique()


def probe_indices(
    norms: torch.Tensor, config: ProbePruneConfig
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The probe's samples ``(S,)`` (``None``: every sample) and positions.

    Positions are ``(B, P)`` in ``mode="sample"`` (per sample) and ``(P,)`` batch-wise.
    Batch-wise, the samples are the ``ceil(samples * B)`` with the largest residual norm over
    the chosen positions (sorted).

    Example:
        >>> n = torch.tensor([[1.0, 5.0, 1.0, 1.0], [2.0, 9.0, 3.0, 1.0]])
        >>> cfg = ProbePruneConfig(mode="batch", samples=0.5, tokens=0.5, select="residual")
        >>> smp, pos = probe_indices(n, cfg)
        >>> smp.tolist(), pos.tolist()
        ([1], [0, 2])
    """
    b, t = norms.shape
    n_pos = n_positions(t, config.tokens)
    if config.mode == "sample":
        if config.select == "stride":
            return None, stride_positions(t, n_pos).expand(b, -1)
        return None, top_positions(norms, n_pos)
    if config.select == "stride":
        pos = stride_positions(t, n_pos)
    else:
        pos = top_positions(norms.norm(dim=0, keepdim=True), n_pos)[0]
    n_smp = max(1, math.ceil(config.samples * b))
    smp = torch.topk(norms[:, pos].norm(dim=1), n_smp).indices.sort().values
    return smp, pos


def _probe_cost(config: ProbePruneConfig, batch: int, t: int) -> float:
    n_pos = n_positions(t, config.tokens)
    n_smp = batch if config.mode == "sample" else max(1, math.ceil(config.samples * batch))
    return 2.0 * n_smp * n_pos / (3.0 * batch * t)


def probe_pays(config: ProbePruneConfig, batch: int, t: int) -> bool:
    """True when a ``(batch, t)`` input is probed: its probe costs at most the ``ratio`` of
    the MLP's products it skips, so the call costs at most the dense MLP.

    Example:
        >>> cfg = ProbePruneConfig()  # ratio 0.3, 15 % of the positions (at least 2)
        >>> probe_pays(cfg, 1, 1), probe_pays(cfg, 1, 4), probe_pays(cfg, 1, 5)
        (False, False, True)
    """
    return config.mode != "static" and _probe_cost(config, batch, t) <= config.ratio


def probe_flops_fraction(config: ProbePruneConfig, batch: int, t: int) -> float:
    """The probe's multiply-adds as a fraction of the dense MLP's on a ``(batch, t)`` input.

    The probe runs the gate and up projections (2 of the MLP's 3 matrices) on its tokens:
    ``2 S P / (3 B T)`` (``S = B`` per sample); ``0`` when static or when the input is too
    short to be probed (:func:`probe_pays`).

    Example:
        >>> round(probe_flops_fraction(ProbePruneConfig(tokens=0.25), 32, 128), 4)
        0.1667
        >>> probe_flops_fraction(ProbePruneConfig(), 1, 1)  # a decode step: not probed
        0.0
    """
    return _probe_cost(config, batch, t) if probe_pays(config, batch, t) else 0.0


def fuse_states(
    probe_sq: torch.Tensor, hist_sq: torch.Tensor, history: float | None
) -> torch.Tensor:
    """Per-channel fused state ``m`` ``(..., H)`` from per-position states ``(..., P, H)``.

    ``w = p / (p + g)`` (importance-scaled) or ``w = 1 - history`` (fixed);
    ``m_j = sum_t (1 - w_tj) g_tj + w_tj p_tj``.
    """
    if history is None:
        w = probe_sq / (probe_sq + hist_sq).clamp(min=1e-12)
    else:
        w = torch.full_like(probe_sq, 1.0 - history)
    return ((1.0 - w) * hist_sq + w * probe_sq).sum(-2)


def channel_importance(down_weight: torch.Tensor, m: torch.Tensor, score: str) -> torch.Tensor:
    """``I_j = m_j ||W[:, j]^2||_2`` (``"ppsp"``) or ``sqrt(m_j) ||W[:, j]||_2`` (``"wanda"``)."""
    if score == "ppsp":
        return m * down_weight.pow(2).norm(dim=0)
    return m.clamp(min=0).sqrt() * down_weight.norm(dim=0)


def kept_channels(importance: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sorted indices of the channels kept when skipping ``floor(ratio * H)`` of the lowest.

    ``importance`` ``(..., H)``: one selection per leading index.
    """
    h = importance.shape[-1]
    drop = min(math.floor(ratio * h), h - 1)
    keep = torch.topk(importance, h - drop, dim=-1, sorted=False).indices
    return keep.sort(dim=-1).values


class ProbeMLP(nn.Module):
    """A LLaMA MLP that skips its least important hidden channels, chosen per sample or batch.

    Keeps the original ``gate_proj``/``up_proj``/``down_proj`` children (names unchanged, so
    artifacts keep their tensor names) and the historical states ``(T, H)`` as a buffer.
    """

    def __init__(self, mlp: nn.Module, hist_sq: torch.Tensor, config: ProbePruneConfig):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.register_buffer("hist_sq", hist_sq.detach().float().clone())
        self.config = config
        self.residual: torch.Tensor | None = None  # set by the layer norm's pre-hook
        self.positions: torch.Tensor | None = None  # set by the decoder layer's pre-hook
        self.mask: torch.Tensor | None = None  # set by the top model's pre-hook
        self.last_kept: torch.Tensor | None = None  # channels of the last batch, for tests
        self.last_probe: tuple[torch.Tensor, torch.Tensor] | None = None

    def catch_residual(self, _norm: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the sibling layer norm: remember its input (the residual)."""
        self.residual = args[0]

    def catch_positions(self, _layer: nn.Module, _args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with kwargs) of the decoder layer: remember its ``position_ids``."""
        self.positions = kwargs.get("position_ids")

    def catch_mask(self, _model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with kwargs) of the top model: remember its ``attention_mask``."""
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.mask = mask if isinstance(mask, torch.Tensor) else None

    def _hist(self, positions: torch.Tensor) -> torch.Tensor:
        """Historical states ``(R, T, H)`` at ``positions`` ``(R, T)`` (past the calibrated
        length: the mean over the calibrated positions)."""
        h = self.hist_sq
        table = torch.cat([h, h.mean(0, keepdim=True)])
        return table[positions.clamp(0, h.shape[0])]

    def _positions(self, b: int, t: int) -> torch.Tensor:
        """``(1 or B, T)`` absolute positions of the input: the caught ``position_ids`` when
        they fit it (a decode step: its place after the cache), else ``0..T-1``."""
        pos, self.positions = self.positions, None
        if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[1] == t:
            if pos.shape[0] in (1, b):
                return pos.to(self.hist_sq.device).long()
        return torch.arange(t, device=self.hist_sq.device).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        cfg = self.config
        x3 = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        residual, self.residual = self.residual, None
        mask, self.mask = self.mask, None
        valid = real_tokens(mask, x3.shape[0], x3.shape[1])  # (B, T) bool; None: no padding
        pos = self._positions(x3.shape[0], x3.shape[1])
        if valid is not None:  # a sentence's real tokens sit where they sit alone
            valid = valid.to(x3.device)
            pos = mask_positions(mask, x3.shape[1]).to(self.hist_sq.device)
        hist = self._hist(pos)  # (1 or B, T, H)
        if valid is not None and (cfg.mode != "batch" or not probe_pays(cfg, *x3.shape[:2])):
            m = self._masked_state(x3, residual, hist, valid)  # (B, H): per sample
        elif not probe_pays(cfg, x3.shape[0], x3.shape[1]):  # static, or too short to probe
            self.last_probe = None
            m = hist.sum(1)
            m = m[0] if m.shape[0] == 1 else m  # (H,): one set, or (B, H): per sample
        else:
            r = residual if residual is not None and residual.shape == x3.shape else x3
            norms = r.detach().float().norm(dim=-1)
            if valid is not None:  # batch-wise: padded tokens rank no position or sample
                norms = norms * valid
            smp, pos = probe_indices(norms, cfg)
            self.last_probe = (smp, pos)
            if smp is None:  # per sample: (B, P, C)
                xp = x3.gather(1, pos.unsqueeze(-1).expand(-1, -1, x3.shape[-1]))
                at = pos.unsqueeze(-1).expand(-1, -1, hist.shape[-1])
                g = hist.expand(x3.shape[0], -1, -1).gather(1, at)  # (B, P, H)
            else:  # batch-wise: (S, P, C)
                xp = x3.index_select(0, smp).index_select(1, pos)
                g = (hist[0] if hist.shape[0] == 1 else hist.index_select(0, smp).mean(0))[pos]
            hp = self.act_fn(self.gate_proj(xp)) * self.up_proj(xp)
            sq = hp.detach().float().pow(2)
            if smp is not None and valid is not None:  # mean over the samples real there
                sq, slots = masked_sample_mean(sq, valid.index_select(0, smp)[:, pos])
                m = fuse_states(sq, g * slots.unsqueeze(-1), cfg.history)
            else:
                m = fuse_states(sq if smp is None else sq.mean(0), g, cfg.history)
        score = channel_importance(self.down_proj.weight.detach().float(), m, cfg.score)
        keep = kept_channels(score, cfg.ratio)  # (K,) or per sample (B, K)
        self.last_kept = keep
        if keep.dim() == 1:
            h = self.act_fn(sliced_linear(self.gate_proj, x, rows=keep))
            h = h * sliced_linear(self.up_proj, x, keep)
            return sliced_linear(self.down_proj, h, cols=keep)
        h = self.act_fn(rows_per_sample(self.gate_proj, x3, keep))
        h = h * rows_per_sample(self.up_proj, x3, keep)
        return cols_per_sample(self.down_proj, h, keep).reshape(x.shape)

    def _masked_state(self, x3, residual, hist, valid) -> torch.Tensor:
        """Per sample, the fused state ``(B, H)`` from its real tokens only: its own probe
        when it pays alone, else the static rule (see :mod:`compactnn.prune.probe_mask`)."""
        cfg = self.config
        hist = hist.expand(x3.shape[0], -1, -1)
        static = (hist * valid.unsqueeze(-1)).sum(1)  # (B, H)
        if cfg.mode == "static":
            self.last_probe = None
            return static
        r = residual if residual is not None and residual.shape == x3.shape else x3
        if cfg.select == "stride":
            pick = lambda row, n: stride_positions(row.shape[1], n)  # noqa: E731
        else:
            pick = lambda row, n: top_positions(row, n)[0]  # noqa: E731
        norms = r.detach().float().norm(dim=-1)
        pos, slots, probed = sample_probes(norms, valid, cfg, probe_pays, n_positions, pick)
        self.last_probe = (None, pos)
        if not bool(probed.any()):
            return static
        xp = x3.gather(1, pos.unsqueeze(-1).expand(-1, -1, x3.shape[-1]))  # (B, P, C)
        g = hist.gather(1, pos.unsqueeze(-1).expand(-1, -1, hist.shape[-1]))
        w = slots.unsqueeze(-1).float()
        sq = (self.act_fn(self.gate_proj(xp)) * self.up_proj(xp)).detach().float().pow(2)
        m = fuse_states(sq * w, g * w, cfg.history)
        return torch.where(probed.unsqueeze(-1), m, static)


def llama_mlps(model: nn.Module, targets: dict[str, nn.Module]) -> list[str]:
    """Names of the LLaMA-style MLPs whose three projections are all among ``targets``."""
    found = []
    for name, m in model.named_modules():
        parts = ("gate_proj", "up_proj", "down_proj")
        if all(isinstance(getattr(m, p, None), nn.Linear) for p in parts) and hasattr(m, "act_fn"):
            if all(f"{name}.{p}" in targets for p in parts):
                found.append(name)
    return found


def _hist_states(model: nn.Module, mlps: list[str], ctx: CompressContext) -> dict:
    """Per position, the mean squared input of each MLP's ``down_proj`` ``(T, H)``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}

    def hook(name: str, args) -> None:
        h = args[0].detach().float()
        h = h.reshape(-1, *h.shape[-2:]) if h.dim() >= 2 else h.reshape(1, 1, -1)
        sq, t = h.pow(2).sum(0), h.shape[1]  # (T, H)
        if name not in sums:
            sums[name], counts[name] = sq.new_zeros(0, sq.shape[1]), sq.new_zeros(0)
        if t > sums[name].shape[0]:  # grow to the longest sequence seen
            grow = t - sums[name].shape[0]
            sums[name] = torch.cat([sums[name], sq.new_zeros(grow, sq.shape[1])])
            counts[name] = torch.cat([counts[name], sq.new_zeros(grow)])
        sums[name][:t] += sq
        counts[name][:t] += h.shape[0]

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
    return {n: sums[n] / counts[n].unsqueeze(1) for n in mlps}


def _wrap(model: nn.Module, name: str, hist: torch.Tensor, config: ProbePruneConfig) -> None:
    """Replace the MLP ``name`` by a ProbeMLP and hook the sibling layer norm's input."""
    probe = ProbeMLP(model.get_submodule(name), hist, config)
    set_module(model, name, probe)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    norm = getattr(parent, NORM_NAME, None)
    if isinstance(norm, nn.Module) and config.needs_residual:
        norm.register_forward_pre_hook(probe.catch_residual)
    if parent is not model:  # the decoder layer: its position_ids place a decode step
        parent.register_forward_pre_hook(probe.catch_positions, with_kwargs=True)
    # the top model's attention_mask: the probe reads each sample's real tokens only
    model.register_forward_pre_hook(probe.catch_mask, with_kwargs=True)


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
    hist = _hist_states(model, mlps, ctx)
    for name in mlps:
        _wrap(model, name, hist[name], config)
    # the statistics travel as the wrappers' float buffers; the header names the wrappers
    ctx.extra[EXTRA_KEY] = {
        "config": config.to_dict(),
        "mlps": mlps,
        "positions": {n: int(hist[n].shape[0]) for n in mlps},
    }
    mode = (
        "static (calibration only)"
        if config.mode == "static"
        else f"{config.mode}-wise probe of {config.tokens:.0%} of the positions"
    )
    ctx.notes.append(
        f"probe pruning: {len(mlps)} MLPs skip {config.ratio:.0%} of their channels per input "
        f"({mode}, {config.score} score)"
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
        width = model.get_submodule(name).down_proj.in_features
        hist = torch.zeros(int(saved["positions"][name]), width)  # overwritten at load
        _wrap(model, name, hist, config)


@register_short_name(r"pp(?P<p>\d+)(?P<static>-static)?", "pp<P>[-static]", ("pp30", "pp30-static"))
def _short_name(m: re.Match[str]) -> Recipe:
    ratio = percent_fraction(m["p"], m.string)
    config = (
        ProbePruneConfig(ratio=ratio, mode="static", score="wanda")
        if m["static"]
        else ProbePruneConfig(ratio=ratio)
    )
    return Recipe(m.string, (Step("probe", config),))
