"""TSQ, Two-Step Quantization (Wang, Hu, Zhang, Zhang, Liu, Cheng, CVPR 2018).

Low-bit training split into two problems solved in turn, then a short fine-tune:

1. **Code learning** (``code_epochs``): the network trains with float weights and sparse
   low-bit activations ``Q(x) = 0 (x <= eps), delta * clamp(round(x / delta), 1, 2^b - 1)
   (x > eps)``. Here ``eps = delta / 2`` (the paper's code uses ``eps = 0.32``,
   ``delta = 0.6487``: ``eps / delta = 0.49``), so the frozen activations are a standard
   unsigned grid that every backend deploys; ``delta`` is learned (LSQ) rather than fixed
   from statistics. After ReLU most inputs fall below ``eps``: the codes are sparse.
2. **Transformation learning**: per layer, with the quantized inputs ``X^`` fixed, the
   ternary weights ``W = alpha T`` (``T`` in ``{-1, 0, 1}``, one ``alpha`` per output
   channel) that best reproduce the step-1 responses ``y = X^ w``::

       min_{alpha, t}  || X^ w - alpha X^ t ||^2  =  (w - alpha t)^T G (w - alpha t),
       G = X^T X  (the Gram of the layer's quantized, unfolded inputs),

   solved iteratively: ``alpha = t^T G w / t^T G t`` (a one-dimensional least squares),
   then each code ``t_j`` set to the value of ``{-1, 0, 1}`` that lowers the objective most
   with the others fixed (coordinate descent), repeated ``iters`` times. (The paper also
   passes ``y`` through the next layer's quantizer, a non-linear least squares relaxed with
   an auxiliary variable; this file solves the linear problem, the relaxation's limit.)
   ``G`` is accumulated over the first 16 training batches of the last code-learning epoch
   (``GramStats(max_batches=16)``; ``compress``, untrained: over the first 16 calibration
   batches, solved at export); with ``least_squares=False``
   it is the identity: plain per-channel ternarisation of the float weights (the ablation).
3. **Fine-tune** (the remaining epochs): the latent weights restart at ``alpha t`` and train
   through a straight-through ternary rounding at the solved ``alpha``.

Frozen, a TSQ layer is a standard signed 2-bit layer with per-channel scales: codes
``{-1, 0, 1}`` and ``alpha`` per output channel.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import (
    EpochMarked,
    LSQAct,
    WeightExport,
    check_ternary_bits,
    fp16,
)
from compactnn.errors import CompactnnError
from compactnn.quant.base import short_act_spec, short_weight_spec
from compactnn.registry import register


def ternary_objective(w: torch.Tensor, alpha: torch.Tensor, t: torch.Tensor, gram: torch.Tensor):
    """``(w_i - alpha_i t_i)^T G (w_i - alpha_i t_i)`` per row: ``w``, ``t`` ``(out, K)``."""
    r = w - alpha[:, None] * t
    return ((r @ gram) * r).sum(dim=1)


def solve_alpha(w: torch.Tensor, t: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``alpha_i = t_i^T G w_i / t_i^T G t_i`` (0 where ``t_i = 0``): ``(out,)``."""
    num = ((t @ gram) * w).sum(dim=1)
    den = ((t @ gram) * t).sum(dim=1)
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


def solve_codes(
    w: torch.Tensor, alpha: torch.Tensor, t: torch.Tensor, gram: torch.Tensor
) -> torch.Tensor:
    """One coordinate-descent sweep over the codes, all rows at once: for each ``j``, the
    ``t_ij`` in ``{-1, 0, 1}`` minimising the objective with the other codes fixed.

    Changing ``t_ij`` by ``d`` changes the objective by ``-2 alpha d (G r)_j + alpha^2 d^2
    G_jj`` with ``r = w - alpha t``; ``g = G r`` is updated in place after each ``j``.
    """
    t = t.clone()
    g = (w - alpha[:, None] * t) @ gram  # (out, K)
    diag = gram.diagonal()
    cand = torch.tensor([-1.0, 0.0, 1.0], dtype=w.dtype, device=w.device)
    for j in range(w.shape[1]):
        d = cand[None, :] - t[:, j : j + 1]  # (out, 3)
        a = alpha[:, None]
        change = -2 * a * d * g[:, j : j + 1] + (a * d) ** 2 * diag[j]
        best = cand[change.argmin(dim=1)]
        delta = best - t[:, j]
        if delta.any():
            t[:, j] = best
            g -= (alpha * delta)[:, None] * gram[j][None, :]
    return t


def tsq_ternary(
    w: torch.Tensor, gram: torch.Tensor | None, iters: int = 3, ratio: float = 0.7
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes (out, K) in {-1, 0, 1}, alpha (out,))`` for rows ``w`` ``(out, K)``.

    Starts from TWN's per-row threshold ``ratio * mean|w|``, then alternates
    :func:`solve_alpha` and :func:`solve_codes` ``iters`` times (``gram=None``: identity).
    """
    w = w.detach().double()
    gram = torch.eye(w.shape[1], dtype=w.dtype, device=w.device) if gram is None else gram.double()
    t = torch.sign(w) * (w.abs() > ratio * w.abs().mean(dim=1, keepdim=True))
    alpha = solve_alpha(w, t, gram)
    for _ in range(iters):
        t = solve_codes(w, alpha, t, gram)
        alpha = solve_alpha(w, t, gram)
    return t.float(), alpha.float()


def conv_padding(layer: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    """What ``layer`` pads its input with, as ``F.pad`` takes it: ``(left, right)`` for a
    Conv1d, ``(left, right, top, bottom)`` for a Conv2d. ``"same"`` pads ``dilation * (k -
    1)`` in all, the odd one on the right/bottom (as torch does for an even kernel);
    ``"valid"`` none.

    Example:
        >>> conv_padding(nn.Conv2d(1, 1, (2, 3), padding="same"))
        (1, 1, 0, 1)
        >>> conv_padding(nn.Conv1d(1, 1, 4, padding="same", dilation=2))
        (3, 3)
    """
    if layer.padding == "valid":
        return (0,) * (2 * len(layer.kernel_size))
    pads: list[int] = []
    if layer.padding == "same":
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    for p in reversed(layer.padding):
        pads += [p, p]
    return tuple(pads)


def grouped_ternary(
    w: torch.Tensor, gram: torch.Tensor | None, iters: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tsq_ternary` of rows ``w`` ``(out, K)``; a ``(groups, K, K)`` Gram (a grouped
    conv) weighs the ``out / groups`` rows of each group by that group's own Gram."""
    if gram is None or gram.dim() == 2:
        return tsq_ternary(w, gram, iters)
    parts = [tsq_ternary(rows, g, iters) for rows, g in zip(w.chunk(len(gram)), gram, strict=True)]
    return torch.cat([t for t, _ in parts]), torch.cat([a for _, a in parts])


def unfold_geometry(layer: nn.Module) -> tuple | None:
    """``(kernel_size, dilation, stride, padding, padding_mode, groups)`` of a Conv1d or a
    Conv2d (one-element tuples for a Conv1d), its padding as :func:`conv_padding`; None for
    a linear layer."""
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        return (
            tuple(layer.kernel_size),
            tuple(layer.dilation),
            tuple(layer.stride),
            conv_padding(layer),
            layer.padding_mode,
            layer.groups,
        )
    return None


def unfold_inputs(x: torch.Tensor, layer: nn.Module | tuple | None) -> torch.Tensor:
    """The layer's input as rows of its weight's columns, padded as the conv pads it (zeros,
    reflect, replicate or circular): ``(rows, K)``; for a grouped conv ``(groups, rows, K)``,
    group ``g``'s input channels against the weights of its output channels. ``layer`` may
    be given as its :func:`unfold_geometry`. A Conv1d's ``(N, C, L)`` input is unfolded as
    an ``(N, C, 1, L)`` image under a ``(1, k)`` kernel: columns ``C * k``, its weight's."""
    geometry = layer if layer is None or isinstance(layer, tuple) else unfold_geometry(layer)
    if geometry is None:
        return x.reshape(-1, x.shape[-1])
    kernel, dilation, stride, pad, mode, groups = geometry
    if any(pad):
        x = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    if len(kernel) == 1:  # Conv1d: a one-row image
        x = x.unsqueeze(-2)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel, dilation, 0, stride).transpose(1, 2)  # (N, L, C * kh * kw)
    if groups == 1:
        return cols.reshape(-1, cols.shape[-1])
    return cols.reshape(-1, groups, cols.shape[-1] // groups).transpose(0, 1)


def world_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed in place over the process group when ``torch.distributed`` runs several
    processes (each has its slice of the global batch); unchanged in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class GramStats:
    """``G = sum X^T X`` of one layer's unfolded inputs over at most ``max_batches`` batches:
    ``(K, K)``, or ``(groups, K, K)`` for a grouped conv (plain object: shared by the layer's
    two quantizers, not a module).

    Under DistributedDataParallel every rank holds the Gram of the *global* batches: a
    training batch's Gram is summed over the ranks' slices as it is added, so all ranks solve
    the same system (the weights the solve writes are not synchronised by DDP) and rank 0's
    checkpoint carries the whole Gram collected so far."""

    def __init__(self, max_batches: int = 16) -> None:
        self.gram: torch.Tensor | None = None
        self.collect = False
        self.batches = 0
        self.max_batches = max_batches

    def reset(self, collect: bool) -> None:
        self.gram, self.batches, self.collect = None, 0, collect

    def add(self, x: torch.Tensor, layer: nn.Module | tuple | None, sliced: bool = False) -> None:
        """Add ``x``'s Gram; ``sliced``: ``x`` is this rank's slice of a global training
        batch, summed over the process group (calibration: every rank sees the same data)."""
        if self.batches >= self.max_batches:
            return
        cols = unfold_inputs(x.detach().float(), layer)
        g = (cols.transpose(-2, -1) @ cols).double()  # float32 product, float64 sum
        if sliced:
            g = world_sum(g)
        self.gram = g if self.gram is None else self.gram + g
        self.batches += 1


# the weight quantizer hook runs before the activation hook of the same layer
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TSQAct(LSQAct):
    """LSQ activations (threshold ``delta / 2``: sparse codes) that also accumulate the
    Gram of their quantized output while their weight quantizer asks for it."""

    def __init__(self, bits: int, layer: nn.Module, stats: GramStats | None) -> None:
        super().__init__(bits)
        self._geometry = unfold_geometry(layer)  # plain values: copies stay independent
        self._stats = stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        stats = self._stats
        if stats is not None and (self.observing or stats.collect):
            stats.add(out, self._geometry, sliced=not self.observing)
        return out


class TSQWeight(EpochMarked):
    """Float weights for ``code_epochs``, then the solved per-channel ternary weights.

    Its state (what a training checkpoint saves): ``alpha``, ``started`` (the last epoch
    :meth:`start_epoch` began: a run resumed inside it neither restarts the Gram nor solves
    again) and, with ``least_squares``, the Gram collected so far (``gram``, empty when none;
    ``gram_batches``), so that a resumed run continues exactly."""

    spec = QuantSpec(bits=2, symmetric=True, granularity="channel")

    def __init__(self, code_epochs: int, iters: int, least_squares: bool) -> None:
        super().__init__()
        self.code_epochs = code_epochs
        self.iters = iters
        self.stats = GramStats() if least_squares else None
        self.real = False
        self.register_buffer("alpha", torch.zeros(0))

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        """Float weights while learning codes (Gram collected in their last epoch); at the
        first fine-tuning epoch, solve and restart the latent weights at ``alpha t`` (then
        the Gram is dropped). Called again for the epoch it began (a run resumed from a
        checkpoint inside it), it keeps the Gram collected so far and the solve."""
        switch = min(self.code_epochs, epochs - 1)
        begun = not self.begin_epoch(epoch)
        self.real = epoch < switch
        if self.stats is not None:
            self.stats.collect = epoch == switch - 1
            if self.stats.collect and not begun:
                self.stats.reset(collect=True)
        if epoch == switch and not begun:
            self.solve(w)
            if self.stats is not None:
                self.stats.gram = None  # used: not carried in every later checkpoint

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.stats is not None:
            gram = self.stats.gram
            destination[prefix + "gram"] = (
                torch.zeros(0, dtype=torch.float64) if gram is None else gram
            )
            destination[prefix + "gram_batches"] = torch.tensor(self.stats.batches)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and alpha.shape != self.alpha.shape:  # solved there, not here
            self.alpha = torch.empty(alpha.shape, dtype=alpha.dtype, device=self.alpha.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        extra = (prefix + "gram", prefix + "gram_batches")
        unexpected_keys[:] = [k for k in unexpected_keys if k not in extra]
        if self.stats is not None and extra[0] in state_dict:
            gram = state_dict[extra[0]]
            device = self.alpha.device  # the run's device (the model moved before loading)
            self.stats.gram = None if gram.numel() == 0 else gram.detach().to(device, copy=True)
            self.stats.batches = int(state_dict.get(extra[1], 0))

    def solve(self, w: torch.Tensor) -> None:
        """Step 2: the ternary codes and ``alpha`` of ``w``; ``w`` becomes ``alpha t``."""
        rows = w.detach().reshape(w.shape[0], -1)
        gram = None if self.stats is None else self.stats.gram
        t, alpha = grouped_ternary(rows, gram, self.iters)
        alpha = fp16(alpha.clamp(min=2.0**-14))
        self.alpha = alpha
        with torch.no_grad():
            w.copy_((alpha[:, None] * t).reshape(w.shape))

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """``clamp(round(w / alpha), -1, 1)`` per output channel (float, ``w``'s shape)."""
        a = self.alpha.reshape(-1, *([1] * (w.dim() - 1)))
        return torch.clamp(torch.round(w / a), -1, 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # step 1, or not solved yet (calibration, before the first epoch): the float
        # weights, untouched (solving here would ternarise them before step 1 begins);
        # outside train, export solves from every calibration batch collected
        if self.real or self.alpha.numel() == 0:
            return w
        a = self.alpha.reshape(-1, *([1] * (w.dim() - 1)))
        return w + (a * self.codes(w.detach()) - w).detach()

    def export(self, w: torch.Tensor) -> WeightExport:
        """Codes ``{-1, 0, 1}`` (int8) and ``alpha`` per output channel."""
        if self.alpha.numel() == 0:
            self.solve(w)
        codes = self.codes(w.detach()).to(torch.int8)
        scale = self.alpha.reshape(-1, 1).clone()
        return WeightExport(codes, scale, torch.zeros_like(scale), self.spec)


@dataclass(frozen=True)
class TSQConfig(QATConfig):
    """TSQ (recipe ``w2a2-tsq``): ternary weights, sparse 2-bit activations.

    Defaults: 6 epochs (4 code learning, 2 fine-tuning), lr 1e-3, step lr 1e-2,
    distillation 0.5 at T=4; first and last layers at 8 bits.

    Args:
        code_epochs: epochs of step 1 (float weights, quantized activations); below
            ``epochs``. ``compactnn.train`` with fewer epochs solves before the last one.
        iters: alternations of the ``alpha`` and code solves in step 2.
        least_squares: weigh the ternary fit by the Gram of the quantized inputs (TSQ);
            False fits the weights themselves (plain per-channel ternarisation).
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(2))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(2))
    epochs: int = 6
    lr_quant: float = 1e-2
    distill: float = 0.5
    code_epochs: int = 4
    iters: int = 3
    least_squares: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight.bits != 2:  # the documented recipe, not the generic w2a8-<method>
            act = self.act.bits if self.act is not None else None
            keep = act is not None and 3 <= act <= 8
            other = f"; w2a{act}-tsq keeps {act}-bit activations" if keep else ""
            raise CompactnnError(
                f"tsq is ternary: weights take 2 bits, not {self.weight.bits}. Use w2a2-tsq "
                f"(the documented recipe{other})."
            )
        check_ternary_bits(self.weight.bits, "tsq")
        if not isinstance(self.code_epochs, int) or not 0 <= self.code_epochs < max(self.epochs, 1):
            raise CompactnnError(
                f"tsq: code_epochs={self.code_epochs!r} must be an integer in [0, epochs="
                f"{self.epochs}): the last epochs fine-tune the ternary weights."
            )
        if not isinstance(self.iters, int) or self.iters < 1:
            raise CompactnnError(f"tsq: iters={self.iters!r} must be a positive integer.")


def tsq_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: TSQConfig) -> nn.Module:
    """Engine hook: the two-step ternary weight quantizer (linked to the layer's inputs)."""
    wq = TSQWeight(config.code_epochs, config.iters, config.least_squares)
    if wq.stats is not None:
        _PENDING[layer] = wq.stats
    return wq


def tsq_act_quantizer(layer: nn.Module, spec: QuantSpec, config: TSQConfig) -> nn.Module:
    """Engine hook: LSQ activations that feed the Gram of the layer's weight solve."""
    return TSQAct(spec.bits, layer, _PENDING.pop(layer, None))


register("tsq", TSQConfig, "TSQ: sparse low-bit codes, then least-squares ternary weights")(
    QATMethod(tsq_weight_quantizer, tsq_act_quantizer)
)
