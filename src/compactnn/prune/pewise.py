"""PE-wise structured pruning with ternarization (Yang, He & Fan, AAAI 2020).

An accelerator computes a layer on an array of processing elements (PEs); each PE takes a
tile of ``group = (G_o, G_i)`` consecutive output x input channels (with the whole kernel
window of a convolution). Pruning whole tiles gives a sparsity the hardware can skip; doing
it while the weights become ternary ``{-a, 0, +a}`` compresses more than either alone.

**Groups.** A weight ``W`` of shape ``(O, I, *k)`` is cut into tiles
``W_g = W[r G_o:(r+1) G_o, c G_i:(c+1) G_i]`` (``O / G_o`` x ``I / G_i`` of them). The tiles
with the smallest norms ``||W_g||_2`` are pruned: ``round(s * n_groups)`` of them per layer
(ties: the lower tile index, row-major, goes first), mask ``m``.

**Ternary weights** (TWN's closed form on the kept weights ``K = {i : m_i = 1}``)::

    delta = ratio / |K| * sum_{i in K} |w_i|
    t_i   = sign(w_i) * [|w_i| > delta] * m_i
    alpha = mean(|w_i| : t_i != 0)
    w_hat = alpha * t                      (gradient: straight through, times m)

**Schedule** (the cubic of Zhu & Gupta; per epoch ``e`` of ``E``, a ramp of
``R = max(1, round(ramp_share * E))`` epochs, by default ``1/3 + 2 s / 3`` of them for
``joint``: 2/3 at 50% as sequential, 5/6 at 75%, the higher the target the slower the ramp;
2/3 for ``sequential``): the sparsity at the start of epoch ``e`` is
``s_e = s * (1 - (1 - min(1, (e + 1) / R)) ** 3)``; the tiles are re-ranked by the norms of
the masked weights, so a pruned tile stays pruned.

* ``schedule="joint"``: the ternary quantizer acts from the first step, while the masks grow.
* ``schedule="sequential"``: float weights under the masks for the first
  ``max(R, round(prune_share * E))`` epochs (prune, then fine-tune at the final mask), then
  ternary weights for the rest (same total epochs).

**Weight penalty clipping** (``wpc = lambda > 0``; this toolkit's reading of the paper's WPC,
whose formula was not retrieved): while the masks grow, a group-lasso penalty pulls toward
zero only the kept tiles that the final sparsity would prune; the penalty of every other tile
is clipped to 0, and the threshold adapts at every step (the norm of the ``round(s n)``-th
smallest tile of the masked weights)::

    C    = {g : m_g = 1, ||W_g||_2 <= ||W_(round(s n))||_2}      (self-adapting threshold)
    loss = task loss + lambda * sum_{g in C} ||W_g||_2            (gradient lambda W_g/||W_g||)

**Frozen fine-tune** (``freeze_epochs = F > 0``): the last ``F`` epochs train at the final
masks with the ternary threshold ``delta`` frozen at its value when that phase starts (the
ramp is shortened to end before it, ``R <= E - F``); ``alpha`` keeps its closed form, so
only weights crossing the fixed threshold change codes.

With ``final_stats`` the ternary ``delta`` and ``alpha`` are taken over the tiles that the
final sparsity keeps while the masks grow, so tiles about to be pruned do not drag them.

With ``w8`` weights the method is PE pruning alone (round-to-nearest int8 with a
straight-through gradient), the reference arm of the benchmark.

Frozen, a layer is a standard signed 2-bit layer (codes ``{-1, 0, +1}``, one scale per layer,
zero point 0); a pruned tile is codes equal to the zero point, which the artifact stores
sparsely (:mod:`compactnn.export.sparse`). Recipes: ``w2a8-pe`` (50% of the tiles), or
``w2a8-pe50``, ``w2-pe75``, ``w2a8-pe50-seq`` (sequential), ``w8a8-pe50`` (int8: PE pruning
alone).

Through :func:`compactnn.compress` (no training: the masks at the final sparsity, the
quantizers calibrated) the step records what it pruned in ``extra["pruning"]["pe"]``
(:mod:`compactnn.prune.pe_record`, printed by ``compactnn compress``) and warns when the
outputs have collapsed, as the other pruning steps do.

Example:
    >>> cfg = PEWiseConfig(group=(1, 8), sparsity=0.5)          # doctest: +SKIP
    >>> q = compactnn.train(model, Recipe("pe", (Step("pe", cfg),)), data)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from compactnn.core.qlayers import rtn_weight_qparams
from compactnn.core.quantize import dequantize, grouped_view
from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import (
    QATConfig,
    QATMethod,
    QATWrapper,
    freeze_layers,
    init_quantizers,
    wrap_layers,
)
from compactnn.engines.qat_quantizers import EpochMarked, WeightExport, fp16
from compactnn.errors import CompactnnError
from compactnn.prune.masks import check_sparsity
from compactnn.prune.pe_groups import check_group, check_pe_layers
from compactnn.prune.pe_record import collapse_words, record_pruning
from compactnn.prune.stats import model_counts
from compactnn.prune.train import ONE_SHOT_AGREEMENT, output_summary, warn_if_collapsed
from compactnn.quant.base import short_act_spec, short_weight_spec
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_short_name, reserve_method_names

SCHEDULES = ("joint", "sequential")


@dataclass(frozen=True)
class PEWiseConfig(QATConfig):
    """PE-wise structured pruning with ternary weights (recipe ``w2a8-pe``).

    Defaults: ternary weights, LSQ 8-bit activations, 6 epochs, distillation 0.5 at T=4 (as
    ``w2a8-twn``); first and last layers at 8 bits and not pruned. ``joint`` prunes the
    tiles over ``1/3 + 2 s / 3`` of the epochs (:func:`default_ramp_share`: 4 of 6 at 50%, 5
    of 6 at 75%, chosen on a validation split of mnist-cnn's training digits);
    ``sequential`` over the first 4 (2/3), with float weights, then ternary weights for 2.

    Args:
        group: the PE tile ``(G_o, G_i)``: output x input channels (with the whole kernel
            window); each must divide the corresponding size of every pruned layer.
        sparsity: fraction of the tiles of each layer that are pruned, in [0, 1).
        schedule: ``"joint"`` (ternary weights while the masks grow) or ``"sequential"``
            (prune with float weights first, then ternarize).
        ramp_share: fraction of the epochs over which the sparsity rises to ``sparsity``
            (``None``: :func:`default_ramp_share`).
        prune_share: ``"sequential"``: fraction of the epochs with float weights.
        ratio: TWN threshold as a multiple of the mean |w| of the kept weights.
        wpc: weight penalty clipping strength ``lambda`` (0: off): while the masks grow, the
            tiles that the final sparsity would prune get the group penalty
            ``lambda ||W_g||_2`` (see :func:`wpc_penalty_grad`).
        final_stats: while the masks grow, ``delta`` and ``alpha`` come from the tiles that
            the final sparsity keeps only (not from tiles about to be pruned).
        freeze_epochs: the last ``freeze_epochs`` epochs fine-tune at the final masks with the
            ternary threshold ``delta`` frozen (0: off; the ramp ends before them).
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(2))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(8))
    epochs: int = 6
    distill: float = 0.5
    group: tuple[int, int] = (1, 8)
    sparsity: float = 0.5
    schedule: str = "joint"
    ramp_share: float | None = None
    prune_share: float = 0.5
    ratio: float = 0.7
    wpc: float = 0.0
    final_stats: bool = False
    freeze_epochs: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight.bits not in (2, 8):
            raise CompactnnError(
                f"PEWiseConfig: weights take 2 bits (ternary, w2a8-pe) or 8 bits (PE pruning "
                f"alone, w8a8-pe), not {self.weight.bits}."
            )
        if len(self.group) != 2 or min(self.group) < 1:
            raise CompactnnError(
                f"PEWiseConfig.group={self.group!r} must be two positive integers "
                "(output channels, input channels), e.g. (1, 8)."
            )
        check_sparsity(self.sparsity, "PEWiseConfig.sparsity", "the PE tiles of each layer")
        if self.schedule not in SCHEDULES:
            raise CompactnnError(
                f"PEWiseConfig.schedule={self.schedule!r}; use 'joint' or 'sequential'."
            )
        for name in ("ramp_share", "prune_share"):
            if getattr(self, name) is not None and not 0.0 < getattr(self, name) <= 1.0:
                raise CompactnnError(
                    f"PEWiseConfig.{name}={getattr(self, name)} must be in (0, 1]."
                )
        if not 0.0 < self.ratio < 2.0:
            raise CompactnnError(f"PEWiseConfig.ratio={self.ratio} must lie in (0, 2).")
        if not 0.0 <= self.wpc < 1.0:
            raise CompactnnError(
                f"PEWiseConfig.wpc={self.wpc} must lie in [0, 1) (0 turns the weight penalty "
                "clipping off; try 1e-3)."
            )
        if self.freeze_epochs < 0:
            raise CompactnnError(
                f"PEWiseConfig.freeze_epochs={self.freeze_epochs} must be >= 0 (0: no frozen "
                "fine-tune phase)."
            )


def group_norms(weight: torch.Tensor, group: tuple[int, int]) -> torch.Tensor:
    """``||W_g||_2`` of every PE tile: shape ``(O / G_o, I / G_i)``."""
    check_group(weight, group)
    go, gi = group
    o, i = weight.shape[0], weight.shape[1]
    w = weight.detach().float().reshape(o // go, go, i // gi, gi, -1)  # (O/Go, Go, I/Gi, Gi, k)
    return w.permute(0, 2, 1, 3, 4).reshape(o // go, i // gi, -1).norm(dim=-1)


def expand_groups(keep: torch.Tensor, weight: torch.Tensor, group: tuple[int, int]) -> torch.Tensor:
    """A ``(O / G_o, I / G_i)`` tile mask as a 0/1 mask of ``weight``'s shape."""
    m = keep.float().repeat_interleave(group[0], 0).repeat_interleave(group[1], 1)  # (O, I)
    return m.reshape(*m.shape, *([1] * (weight.dim() - 2))).expand_as(weight).contiguous()


def pe_group_mask(weight: torch.Tensor, group: tuple[int, int], sparsity: float) -> torch.Tensor:
    """0/1 mask (``weight``'s shape) that prunes ``round(sparsity * n)`` tiles of smallest
    norm; ties go to the lower tile index (row-major over ``(O / G_o, I / G_i)``)."""
    norms = group_norms(weight, group)
    n_prune = math.floor(sparsity * norms.numel() + 0.5)
    keep = torch.ones(norms.numel(), dtype=torch.bool)
    order = torch.sort(norms.reshape(-1), stable=True).indices
    keep[order[:n_prune]] = False
    return expand_groups(keep.reshape(norms.shape), weight, group)


def ternary_threshold(
    w: torch.Tensor, mask: torch.Tensor, ratio: float = 0.7, stats: torch.Tensor | None = None
) -> torch.Tensor:
    """TWN's ``delta = ratio * mean(|w_i| : i in stats)`` (``stats`` default ``mask``)."""
    stats = mask if stats is None else stats
    return ratio * (w.detach().abs() * mask * stats).sum() / stats.sum().clamp(min=1)


def masked_ternary(
    w: torch.Tensor,
    mask: torch.Tensor,
    ratio: float = 0.7,
    stats: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, alpha)`` of TWN's closed form on the kept weights: codes in ``{-1, 0, 1}``
    (float, ``w``'s shape, 0 in pruned tiles), ``alpha`` the scale (a 0-dim tensor).

    ``stats`` (a 0/1 mask inside ``mask``; default ``mask``): the weights whose mean |w| sets
    ``delta`` and whose codes set ``alpha``, e.g. the tiles that survive the final sparsity.
    ``delta``: a fixed threshold instead of :func:`ternary_threshold` (the frozen phase).
    """
    stats = mask if stats is None else stats
    a = w.detach().abs() * mask
    if delta is None:
        delta = ternary_threshold(w, mask, ratio, stats)
    keep = (a > delta) & (mask > 0)
    sel = keep & (stats > 0)
    alpha = a[sel].mean() if sel.any() else w.new_zeros(())
    return torch.sign(w.detach()) * keep, alpha


def wpc_candidates(
    w: torch.Tensor, mask: torch.Tensor, group: tuple[int, int], sparsity: float
) -> torch.Tensor:
    """0/1 mask of the kept weights in tiles that the final ``sparsity`` would prune: the
    self-adapting threshold is the norm of the ``round(s n)``-th smallest tile of ``w m``."""
    return mask * (1.0 - pe_group_mask(w.detach() * mask, group, sparsity))


def wpc_penalty_grad(
    w: torch.Tensor, candidates: torch.Tensor, group: tuple[int, int], lam: float
) -> torch.Tensor:
    """Gradient of ``P(W) = lambda * sum_{g in C} ||W_g||_2`` over the candidate tiles ``C``:
    ``lambda W_g / ||W_g||_2`` on them (0 on a tile of norm 0), 0 elsewhere."""
    wc = w.detach() * candidates
    norms = expand_groups(group_norms(wc, group), wc, group)
    return lam * wc / norms.clamp(min=torch.finfo(wc.dtype).tiny)


class _WeightPenalty(torch.autograd.Function):
    """Identity on ``out``; the backward adds a fixed penalty gradient to ``w``."""

    @staticmethod
    def forward(ctx, out, w, grad_w):
        ctx.save_for_backward(grad_w)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        (grad_w,) = ctx.saved_tensors
        return grad_out, grad_w, None


def default_ramp_share(config: PEWiseConfig) -> float:
    """The ramp's share of the epochs: ``1/3 + 2 s / 3`` for ``joint`` (2/3 at 50%
    of the tiles, sequential's share; 5/6 at 75%), 2/3 for ``sequential``.

    Chosen on mnist-cnn with the last 15% of the training digits held out (3 seeds): at 50%,
    ramps of 1/2, 2/3, 5/6 scored 97.6, 97.9, 97.8; at 75%, 2/3 and 5/6 scored 88.1, 89.0.
    """
    if config.schedule == "sequential":
        return 2 / 3
    return 1 / 3 + 2 * config.sparsity / 3


def ramp_epochs(epochs: int, config: PEWiseConfig) -> int:
    """Epochs over which the sparsity rises (``R``)."""
    share = config.ramp_share
    if share is None:
        share = default_ramp_share(config)
    return max(1, min(round(share * epochs), epochs - config.freeze_epochs))


def float_epochs(epochs: int, config: PEWiseConfig) -> int:
    """Leading epochs with float weights: 0 for ``joint``; ``sequential``: prune and
    fine-tune first (at least the ramp), leaving at least one ternary epoch when it can."""
    if config.schedule == "joint":
        return 0
    n = max(ramp_epochs(epochs, config), round(config.prune_share * epochs))
    return min(n, max(epochs - 1, 0))


def scheduled_sparsity(epoch: int, epochs: int, config: PEWiseConfig) -> float:
    """``s_e = s * (1 - (1 - min(1, (e + 1) / R)) ** 3)`` at the start of epoch ``e``."""
    t = min(1.0, (epoch + 1) / ramp_epochs(epochs, config))
    return config.sparsity * (1.0 - (1.0 - t) ** 3)


class PEWiseWeight(EpochMarked):
    """The weight quantizer: a PE-tile mask (buffer ``mask``) and ternary (or int8) weights.

    Outside training (``compress``), the mask is the one-shot mask at the final sparsity;
    ``start_epoch`` (``compactnn.train``) moves it along the schedule.
    """

    ternary_spec = QuantSpec(bits=2, symmetric=True, granularity="tensor")

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, config: PEWiseConfig) -> None:
        super().__init__()
        self.config, self.spec = config, spec
        self.float_phase = False
        self.penalize = False  # weight penalty clipping: on while the masks grow
        self.penalize_window = False
        self.register_buffer("mask", pe_group_mask(weight, config.group, config.sparsity))
        # the frozen phase's ternary threshold; negative: not frozen (recomputed every step)
        self.register_buffer("delta", torch.full((), -1.0))

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        """Revise the mask to the schedule's sparsity; pick float or quantized weights.
        The mask moves once per epoch: for the epoch already started (a run resumed from a
        mid-epoch checkpoint) only the phase flags are set."""
        s = scheduled_sparsity(epoch, epochs, self.config)
        if self.begin_epoch(epoch):
            self._revise(w, epoch, epochs, s)
        self.float_phase = epoch < float_epochs(epochs, self.config)
        self.penalize_window = s < self.config.sparsity  # the masks still grow
        self.penalize = self.config.wpc > 0 and self.penalize_window

    def keep_eligible(self) -> bool:
        """``keep_best`` hook: whether the model of the epoch under way may be delivered:
        its mask prunes the recipe's ``round(s n)`` tiles. Not while the masks grow: such a
        model prunes fewer tiles than the recipe (and the artifact's record) say."""
        tiles = group_norms(self.mask, self.config.group)  # 0: a pruned tile
        final = math.floor(self.config.sparsity * tiles.numel() + 0.5)
        return int((tiles == 0).sum()) >= final

    def _revise(self, w: torch.Tensor, epoch: int, epochs: int, s: float) -> None:
        """The mask at sparsity ``s``; the frozen phase's threshold at its first epoch."""
        with torch.no_grad():
            if epoch == 0:
                self.mask.fill_(1.0)  # training starts dense: the schedule prunes
            self.mask.copy_(pe_group_mask(w * self.mask, self.config.group, s))
            frozen = epoch >= epochs - self.config.freeze_epochs
            if not frozen:
                self.delta.fill_(-1.0)
            elif self.delta < 0:  # the frozen phase starts
                self.delta.copy_(ternary_threshold(w, self.mask, self.config.ratio))

    def quantized(self, w: torch.Tensor) -> torch.Tensor:
        """The dequantized weight (no gradient path)."""
        if self.spec.bits == 2:
            stats = None
            if self.config.final_stats and self.penalize_window:
                stats = pe_group_mask(
                    w.detach() * self.mask, self.config.group, self.config.sparsity
                )
            codes, alpha = masked_ternary(w, self.mask, self.config.ratio, stats, self.frozen())
            return alpha * codes
        codes, scale, zero = rtn_weight_qparams(w.detach() * self.mask, self.spec)
        cg = grouped_view(codes, self.spec.granularity, self.spec.group_size)
        return dequantize(cg, scale, zero).reshape(w.shape)

    def frozen(self) -> torch.Tensor | None:
        """The frozen threshold, or None while ``delta`` follows the weights."""
        return self.delta if self.config.freeze_epochs > 0 and self.delta >= 0 else None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wm = w * self.mask  # pruned tiles: zero, no gradient
        out = wm if self.float_phase else wm + (self.quantized(w) - wm).detach()
        if self.penalize and self.training and w.requires_grad:
            cfg = self.config
            cand = wpc_candidates(w, self.mask, cfg.group, cfg.sparsity)
            out = _WeightPenalty.apply(out, w, wpc_penalty_grad(w, cand, cfg.group, cfg.wpc))
        return out

    def export(self, w: torch.Tensor) -> WeightExport:
        """Ternary: codes ``{-1, 0, 1}`` and one fp16 scale; int8: round-to-nearest codes."""
        if self.spec.bits == 8:
            return WeightExport(*rtn_weight_qparams(w.detach() * self.mask, self.spec), self.spec)
        codes, alpha = masked_ternary(w, self.mask, self.config.ratio, delta=self.frozen())
        scale = fp16(alpha.clamp(min=2.0**-14)).reshape(1, 1)
        return WeightExport(codes.to(torch.int8), scale, torch.zeros(1, 1), self.ternary_spec)


def pewise_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: PEWiseConfig) -> nn.Module:
    """Engine hook: the PE-tile mask and ternary weights of ``layer`` (activations: LSQ);
    the layers whose channels the group does not divide were refused together, by name,
    before any wrapping (:func:`~compactnn.prune.pe_groups.check_pe_layers`)."""
    return PEWiseWeight(layer.weight, spec, config)


@dataclass(frozen=True)
class _PEWiseMethod(QATMethod):
    """The training-aware hooks (``compactnn.train`` uses them) with, as the ``compress``
    handler, the post-training variant that also records what it pruned and warns, as the
    other pruning steps do, when the outputs have collapsed (one-shot: below
    ``ONE_SHOT_AGREEMENT``, its remedy being the training it skipped)."""

    def __call__(self, model, targets, config, ctx):
        before = model_counts(model, ctx)  # the float model, for the record
        reference = output_summary(model, ctx) if ctx.batches else None
        dense = {
            n: int((m.weight != 0).sum())
            for n, m in targets.items()
            if isinstance(getattr(m, "weight", None), torch.Tensor)
        }
        wrap_layers(model, targets, config, ctx, self)
        init_quantizers(model, ctx)
        layers = [
            name
            for name, m in model.named_modules()
            if isinstance(m, QATWrapper) and isinstance(m.weight_quantizer, PEWiseWeight)
        ]
        freeze_layers(model, ctx)
        record_pruning(ctx, config, model, layers, dense, before)
        if reference is not None:
            words = collapse_words(config)
            warn_if_collapsed(model, reference, ctx, *words, min_agreement=ONE_SHOT_AGREEMENT)
        return model


register("pe", PEWiseConfig, "PE-wise structured pruning with ternary weights (AAAI 2020)")(
    _PEWiseMethod(pewise_weight_quantizer, check_layers=check_pe_layers, plain_ends=True)
)


reserve_method_names(r"pe\d+", "-pe<P> is PE-wise pruning's sparsity in w<2|8>[a<A>]-pe<P>")


@register_short_name(
    r"w(?P<w>\d+)(?:a(?P<a>\d+))?-pe(?P<p>\d+)(?P<seq>-seq)?",  # bits: PEWiseConfig checks
    "w<2|8>[a<A>]-pe<P>[-seq]",
    ("w2a8-pe50", "w2-pe75", "w2a8-pe50-seq", "w8a8-pe50"),
)
def _short_name(m: re.Match[str]) -> Recipe:
    percent = int(m["p"])
    if percent >= 100:
        raise CompactnnError(
            f"recipe {m.string!r}: the share of PE tiles pruned, {percent}%, must lie in "
            "[0, 100), e.g. w2a8-pe50 (half the tiles) or w2a8-pe75."
        )
    config = PEWiseConfig.from_short(
        int(m["w"]),
        int(m["a"]) if m["a"] else None,
        None,
        sparsity=percent / 100,
        schedule="sequential" if m["seq"] else "joint",
    )
    return Recipe(m.string, (Step("pe", config),))
