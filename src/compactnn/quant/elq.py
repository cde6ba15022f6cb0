"""ELQ: explicit loss-error-aware quantization (Zhou, Yao et al., CVPR 2018).

Binary (``w1``) or ternary (``w2``) weights trained so that quantizing them perturbs the
loss as little as possible. A second-order expansion of the loss around the float weights
``w`` gives, with a diagonal Hessian ``D = diag(d)``::

    L(w_q) - L(w) ~ g^T (w_q - w) + 1/2 (w_q - w)^T D (w_q - w)

The training step on ``w`` absorbs the first-order term (what is quantized is the updated
weight, the proximal-Newton view of loss-aware binarisation), so each layer (or output
channel) solves ``min_{alpha, t} sum_i d_i (w_i - alpha t_i)^2`` with ``d`` the square root
of Adam's bias-corrected second moment of the gradient (the usual diagonal-Hessian proxy,
tracked here on the quantized weights' gradient). ELQ regularises the weight approximation
error too: with ``approx = lambda > 0`` the weights are ``d_i + lambda mean(d)`` (mean over
the row), i.e. the objective ``sum_i d_i (w_i - alpha t_i)^2 + lambda mean(d) ||w - alpha
t||^2``, the loss term plus the plain approximation error in the same units (``lambda -> inf``:
XNOR's / TWN's unweighted fit). Closed forms (``d`` standing for the combined weights):

* binary, ``t = sign(w)``: ``alpha = sum_i d_i |w_i| / sum_i d_i``;
* ternary, ``t_i = sign(w_i) [|w_i| > delta]``: for a fixed support ``S``,
  ``alpha_S = sum_S d|w| / sum_S d`` and the error is ``sum d w^2 - (sum_S d|w|)^2 / sum_S d``;
  given ``alpha`` every weight picks ``|w_i| > alpha / 2`` whatever ``d_i``, so the optimal
  support holds the ``k`` largest ``|w|`` and ``k = argmax_k (sum_{top k} d|w|)^2 /
  sum_{top k} d`` (exact, one sort). The threshold is ``delta`` between ranks ``k`` and
  ``k + 1``. Before any gradient ``d = 1``: the least-squares binary / ternary fit.

Incremental schedule (as INQ): at the start of stage ``j`` the free weights with the
largest weighted error ``d_i (w_i - alpha t_i)^2`` are frozen to their codes until
``portions[j]`` of each layer is frozen (the free weights retrain to make up for the
costliest quantizations; the last to go are those already near a level); frozen weights take
``alpha t_i``, free weights stay float and keep training, and ``alpha`` is refitted to the
frozen codes, ``alpha = sum d w t / sum d t^2``. Freezing quantizes the rest and refits
``alpha`` over the whole layer. With ``portions=()`` every weight is quantized from the start
(straight-through gradient for the codes; with ``scale_grad`` the gradient also reaches
``w`` through ``alpha = sum_S d|w| / sum_S d``, ``d`` and ``S`` held, as XNOR-Net's does
through ``mean|w|``). Frozen: 1-bit codes with a ``[-alpha, +alpha]`` codebook, or
signed 2-bit codes ``{-1, 0, 1}`` with scale ``alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import WeightExport, apply_due_stages, fp16
from compactnn.errors import CompactnnError
from compactnn.quant.base import short_act_spec, short_weight_spec
from compactnn.registry import register


def elq_binary(w: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, alpha)`` per row of 2-D ``w``: codes ``sign(w)`` (``+1`` at 0), ``alpha``
    ``(rows,)`` minimising ``sum_i d_i (w_i - alpha t_i)^2``."""
    codes = torch.where(w >= 0, 1.0, -1.0)
    alpha = (d * w.abs()).sum(1) / d.sum(1).clamp(min=1e-30)
    return codes, alpha


def elq_ternary(w: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, alpha)`` per row of 2-D ``w``: the exact minimiser of
    ``sum_i d_i (w_i - alpha t_i)^2`` over ``alpha >= 0`` and ``t in {-1, 0, 1}``."""
    mag, order = w.abs().sort(dim=1, descending=True)
    dw = torch.gather(d, 1, order)
    num = torch.cumsum(dw * mag, 1)
    den = torch.cumsum(dw, 1).clamp(min=1e-30)
    k = (num * num / den).argmax(dim=1, keepdim=True)  # support = ranks 0..k
    alpha = (num.gather(1, k) / den.gather(1, k)).squeeze(1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(w.shape[1], device=w.device).expand_as(order))
    codes = torch.sign(w) * (rank <= k)
    return codes, alpha


def refit_scale(w: torch.Tensor, d: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``alpha = sum d w t / sum d t^2`` per row: the weighted least-squares scale of fixed
    codes (0 for a row without non-zero codes)."""
    den = (d * codes * codes).sum(1)
    num = (d * w * codes).sum(1)
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(den))


class ELQWeight(nn.Module):
    """Loss-error-aware binary / ternary weights with an optional incremental schedule.

    Args:
        weight: the layer's float weight (shapes the buffers).
        bits: 1 (binary) or 2 (ternary).
        portions: cumulative fractions frozen at the starts of the stages (may be empty).
        per_channel: one ``alpha`` per output channel (else one per layer).
        beta: decay of the squared-gradient average (Adam's ``beta2``).
        scale_grad: let the gradient reach ``w`` through the scale too.
        approx: ``lambda``, the weight of the approximation-error term (0: loss term only).
        frozen_codes: weights quantized at a stage keep their codes (INQ's); False: they
            keep training through codes re-solved each step (straight-through), the rest
            float.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        portions: tuple[float, ...] = (),
        per_channel: bool = True,
        beta: float = 0.999,
        scale_grad: bool = True,
        approx: float = 0.0,
        frozen_codes: bool = True,
    ) -> None:
        super().__init__()
        self.scale_grad, self.approx, self.frozen_codes = scale_grad, approx, frozen_codes
        self.bits, self.portions, self.per_channel, self.beta = bits, portions, per_channel, beta
        gran = "channel"
        self.spec = QuantSpec(bits=bits, symmetric=bits == 2, granularity=gran)
        self.register_buffer("sq_grad", torch.zeros(weight.shape))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("frozen", torch.zeros(weight.shape, dtype=torch.bool))
        self.register_buffer("codes", torch.zeros(weight.shape))
        rows = weight.shape[0] if per_channel else 1
        self.register_buffer("alpha", torch.zeros(rows))
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1) if self.per_channel else t.reshape(1, -1)

    def hessian(self) -> torch.Tensor:
        """``d``: ``sqrt(v / (1 - beta^n)) + 1e-8`` (Adam's preconditioner), plus ``approx``
        times its mean over each row view; 1 before any gradient has been seen."""
        n = int(self.steps)
        if n == 0:
            return torch.ones_like(self.sq_grad)
        d = torch.sqrt(self.sq_grad / (1 - self.beta**n)) + 1e-8
        if self.approx > 0:
            rows = self._rows(d)
            d = (rows + self.approx * rows.mean(1, keepdim=True)).reshape(d.shape)
        return d

    def _track(self, g: torch.Tensor) -> None:
        with torch.no_grad():
            self.sq_grad.mul_(self.beta).add_(g.detach() * g.detach(), alpha=1 - self.beta)
            self.steps.add_(1)

    def solve(
        self, w: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, alpha)`` of the closed form on ``w`` (rows view) with the current ``d``;
        ``mask``: fit ``alpha`` to the masked weights only (``d`` zeroed elsewhere)."""
        fn = elq_binary if self.bits == 1 else elq_ternary
        d = self.hessian() if mask is None else self.hessian() * mask
        return fn(self._rows(w.detach()), self._rows(d))

    def _alpha_full(self, alpha: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        a = fp16(alpha)  # as the artifact stores it
        rows = a if self.per_channel else a.expand(w.shape[0])
        return rows.reshape(-1, *([1] * (w.dim() - 1)))

    def freeze_portion(self, w: torch.Tensor, portion: float) -> None:
        """Freeze the free weights of largest weighted error ``d (w - alpha t)^2`` until
        ``portion`` of each row view is frozen; refit ``alpha`` to the frozen codes."""
        codes, alpha = self.solve(w)
        wr, dr = self._rows(w.detach()), self._rows(self.hessian())
        frozen = self._rows(self.frozen)
        old = self._rows(self.codes) if self.frozen_codes else codes  # re-solved: current
        err = dr * (wr - alpha[:, None] * codes) ** 2
        n_target = round(portion * wr.shape[1])
        n_new = (n_target - frozen.sum(1)).clamp(min=0)
        order = err.masked_fill(frozen, -math.inf).argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(wr.shape[1]).expand_as(order))
        new = (rank < n_new[:, None]) & ~frozen
        all_codes = torch.where(frozen, old, torch.where(new, codes, torch.zeros_like(codes)))
        mask = frozen | new
        self.alpha.copy_(refit_scale(wr, dr * mask, all_codes))
        self.codes.copy_(all_codes.reshape(w.shape))
        self.frozen.copy_(mask.reshape(w.shape))

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        """Apply every stage due by ``epoch`` (stages spread evenly over the epochs)."""
        apply_due_stages(self, w, epoch, epochs)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        staged = int(self.stage) > 0
        if staged and self.frozen_codes:  # incremental: frozen codes, free weights float
            out = torch.where(self.frozen, self._alpha_full(self.alpha, w) * self.codes, w)
        else:  # every weight, or (staged, not frozen) the quantized ones: straight-through
            out = self._straight_through(w, self.frozen if staged else None)
        if out.requires_grad and self.training:
            out.register_hook(self._track)
        return out

    def _straight_through(self, w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``alpha t`` by the closed form, fitted on ``mask`` (None: all); float elsewhere."""
        codes, alpha = self.solve(w, mask)
        if self.scale_grad:  # alpha as a function of w (d and the support held)
            d = self.hessian() if mask is None else self.hessian() * mask
            dr = self._rows(d) * (codes != 0)
            live = (dr * self._rows(w).abs()).sum(1) / dr.sum(1).clamp(min=1e-30)
            rows = live + (fp16(alpha) - live).detach()  # value: the stored scale
            rows = rows if self.per_channel else rows.expand(w.shape[0])
            a = rows.reshape(-1, *([1] * (w.dim() - 1)))
            out = a * (codes.reshape(w.shape) + (w - w.detach()))
        else:
            q = self._alpha_full(alpha, w) * codes.reshape(w.shape)
            out = w + (q - w).detach()
        return out if mask is None else torch.where(mask, out, w)

    def final(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, alpha)`` of the whole layer: frozen codes kept, the rest by the closed
        form (incremental: nearest level at the refitted scale), ``alpha`` refitted."""
        codes, alpha = self.solve(w)
        if int(self.stage) == 0 or not self.frozen_codes:
            return codes.reshape(w.shape), alpha
        wr, dr = self._rows(w.detach()), self._rows(self.hessian())
        a = self.alpha[:, None]
        if self.bits == 1:
            free = torch.where(wr >= 0, 1.0, -1.0)
        else:
            free = torch.sign(wr) * (wr.abs() > a / 2)
        all_codes = torch.where(self._rows(self.frozen), self._rows(self.codes), free)
        return all_codes.reshape(w.shape), refit_scale(wr, dr, all_codes)

    def export(self, w: torch.Tensor) -> WeightExport:
        codes, alpha = self.final(w)
        rows = w.shape[0]
        a = fp16(alpha if self.per_channel else alpha.expand(rows)).reshape(rows, 1)
        zero = torch.zeros(rows, 1)
        if self.bits == 2:
            return WeightExport(codes.to(torch.int8), a.clamp(min=2.0**-14), zero, self.spec)
        levels = torch.stack([-a, a], dim=-1)  # (rows, 1, 2)
        ones = torch.ones(rows, 1)
        return WeightExport((codes > 0).to(torch.uint8), ones, zero, self.spec, levels)


BINARY_TRAINING = {
    "epochs": 6, "min_steps": 600, "lr": 5e-3, "lr_quant": 1e-2, "distill": 0.0, "approx": 0.0,
}  # fmt: skip
"""Training of 1-bit ELQ (``w1a8-elq``): the budget and learning rates of ``w1a8-xnor``;
loss term only (``approx`` 0 beat 1 on a validation split of the training digits, and the
incremental schedules lost; docs/lowbit-training.md)."""


@dataclass(frozen=True)
class ELQConfig(QATConfig):
    """ELQ binary or ternary weights, LSQ activations (recipes ``w1a8-elq``, ``w2a8-elq``).

    Defaults: ternary weights and 8-bit activations, 4 epochs, lr 1e-3, distillation 0.5 at
    T=4 (as ``w2a8-twn``); first and last layers at 8 bits; one scale per output channel;
    no incremental stages (``portions=()``: measured better than the paper's schedule in a
    few epochs of fine-tuning, docs/lowbit-training.md). With 1-bit weights
    (:meth:`from_short` ``w1``, recipe ``w1a8-elq``) the training budget of the binary
    recipes (``BINARY_TRAINING``: as ``w1a8-xnor``, 6 epochs but at least 600 optimizer
    steps, lr 5e-3, quantizer lr 1e-2, loss term only, ``approx=0``: chosen over 1 and
    over both incremental schedules on a validation split of the training digits); a
    keyword given to :meth:`from_short` wins.

    Args:
        portions: cumulative fractions of each layer frozen at the stage starts (e.g.
            ``(0.5, 0.75, 0.875)``, INQ's); ``()`` quantizes every weight from the start
            (straight-through).
        per_channel: one scale per output channel (False: one per layer, as TWN).
        beta: decay of the squared-gradient average that gives the diagonal Hessian.
        scale_grad: the gradient also flows through the scale's closed form (False: plain
            straight-through to ``w``).
        min_steps: :func:`compactnn.train` without ``epochs=`` trains at least this many
            optimizer steps (more epochs on a small dataset); 0: the recipe's epochs.
        approx: ``lambda``, weight of the approximation-error term beside the loss term
            (Hessian-weighted error): per-weight weights ``d_i + lambda mean(d)``; 0: loss
            term only.
        frozen_codes: with ``portions``, the weights quantized at a stage keep their codes
            (INQ's, the default); False: they keep training straight-through (codes and
            ``alpha`` re-solved each step), the rest float, so a schedule ending at 1.0
            ends as the plain straight-through training.
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(2))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(8))
    epochs: int = 4
    distill: float = 0.5
    portions: tuple[float, ...] = ()
    per_channel: bool = True
    beta: float = 0.999
    scale_grad: bool = True
    min_steps: int = 0
    approx: float = 0.0
    frozen_codes: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.min_steps) is not int or self.min_steps < 0:
            raise CompactnnError(f"elq: min_steps={self.min_steps!r} must be an integer >= 0.")
        if self.weight.bits not in (1, 2):
            raise CompactnnError(
                f"elq quantizes weights to 1 bit (w1a8-elq) or 2 bits (w2a8-elq), not "
                f"{self.weight.bits}."
            )
        p = list(self.portions)
        if p != sorted(p) or not all(0.0 < x <= 1.0 for x in p):
            raise CompactnnError(f"portions={self.portions} must increase within (0, 1].")
        if not 0.0 < self.beta < 1.0:
            raise CompactnnError(f"beta={self.beta} must lie in (0, 1).")
        if not self.approx >= 0.0:
            raise CompactnnError(f"elq: approx={self.approx} must be >= 0 (0: loss term only).")

    @classmethod
    def from_short(cls, wbits, abits, group, range_method="minmax", **kwargs):
        """Short names ``w1a8-elq`` / ``w2a8-elq``; 1-bit weights train with
        ``BINARY_TRAINING`` unless ``kwargs`` says otherwise."""
        if wbits == 1:
            kwargs = {**BINARY_TRAINING, **kwargs}
        return super().from_short(wbits, abits, group, range_method=range_method, **kwargs)


def elq_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: ELQConfig) -> nn.Module:
    """Engine hook: ELQ weights at ``spec.bits`` (activations: LSQ)."""
    return ELQWeight(
        layer.weight, spec.bits, config.portions, config.per_channel, config.beta,
        config.scale_grad, config.approx, config.frozen_codes,
    )  # fmt: skip


register("elq", ELQConfig, "ELQ: loss-error-aware binary/ternary weights, incremental")(
    QATMethod(elq_weight_quantizer)
)
