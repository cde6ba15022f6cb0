"""Trainable quantizer parts that several training-aware methods share.

* straight-through helpers (``round_ste``, ``clipped_ste_quant``, ``grid_fake_quant``) and
  ``fp16`` (artifacts store scales and levels as float16);
* :class:`WeightExport`: what a weight quantizer's ``export`` returns;
* :class:`ObservingAct`: base of activation quantizers on a ``scale * [qmin, qmax]`` grid;
* LSQ (Esser et al., 2020), the engine's default activation quantizer and the quantizer of
  first and last layers whose bits the recipe raises;
* :class:`STEWeight`: round-to-nearest weights with a straight-through gradient (STE, PACT);
* :class:`EpochMarked`: a weight quantizer whose ``start_epoch`` changes its state once per
  epoch, also when a run resumed from a mid-epoch checkpoint calls it again.

LSQ: ``v_hat = clamp(round(v / s), Qn, Qp) * s`` with the step ``s`` learned. Its gradient
(straight-through for ``round``)::

    dv_hat/dv = 1                       if Qn < v/s < Qp, else 0
    dv_hat/ds = round(v/s) - v/s        if Qn < v/s < Qp
                Qn or Qp                at or beyond the clip

and the step's gradient is multiplied by ``g = 1 / sqrt(N * Qp)`` (``N``: elements sharing
the step) so that step and weights learn at comparable rates. Weights: symmetric signed grid
per output channel, step initialised by the MSE-optimal clip. Activations: per tensor,
unsigned after ReLU and signed otherwise, step initialised to ``2 mean|x| / sqrt(Qp)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compactnn.core.qlayers import rtn_weight_qparams
from compactnn.core.quantize import dequantize, grouped_view
from compactnn.core.ranges import estimate_range
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError


@dataclass
class WeightExport:
    """Integer form of a trained weight: ``codes`` (weight's shape), ``scale``/``zero``
    ``(rows, ngroups)``, the ``spec`` of the grid, and an optional codebook
    ``levels`` ``(rows, ngroups, 2**bits)`` for non-uniform grids, or the binary ``basis``
    ``(rows, ngroups, bits)`` (float16-representable) those levels are the sign sums of."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    levels: torch.Tensor | None = None
    basis: torch.Tensor | None = None


def fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16-representable float32 (artifacts store scales and levels as fp16)."""
    return x.detach().to(torch.float16).to(torch.float32)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def clipped_ste_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, qmin: int, qmax: int
) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale`` with a clipped
    straight-through gradient to ``x``: 1 where the rounded code lies on the grid (its
    bounds included), 0 where it was clipped."""
    code = torch.round(x.detach() / scale) + zero
    inside = ((code >= qmin) & (code <= qmax)).to(x.dtype)
    value = (torch.clamp(code, qmin, qmax) - zero) * scale
    return x * inside + (value - x * inside).detach()


def grid_fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` with a clipped straight-through
    gradient to ``x``: what ``ActQuantizer`` computes with zero point 0, so a frozen model
    reproduces training's forward."""
    return clipped_ste_quant(x, scale, 0.0, qmin, qmax)


def act_grid(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-wide activation grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def check_act_bits(bits: int, who: str) -> None:
    """Refuse 1-bit activations on a uniform grid: they need a binary block."""
    if bits < 2:
        raise CompactnnError(
            f"{who} cannot quantize activations to {bits} bit: 1-bit activations need a "
            "binary method (w1a1-xnor, w1a1-bireal, w1a1-reactnet)."
        )


def check_ternary_bits(bits: int, method: str) -> None:
    """Refuse weight bits other than 2 for a ternary method (TWN, TTQ)."""
    if bits != 2:
        raise CompactnnError(
            f"{method} is ternary: weights take 2 bits (w2a8-{method}), not {bits}."
        )


class ObservingAct(nn.Module):
    """Base of activation quantizers on a ``scale * [qmin, qmax]`` grid, zero point 0.

    Before training, ``observe`` mode collects min, max and mean |x| over calibration
    batches; ``finish_observing`` initialises the method's parameters from them. Inputs with
    negative values get a signed grid, non-negative ones (after ReLU) an unsigned grid.
    Subclasses implement ``init_from_stats``, ``step_size`` and ``forward``.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        check_act_bits(bits, type(self).__name__)
        self.bits = bits
        self.signed = False
        self.observing = False
        self.stats: dict[str, float] = {}

    @property
    def grid(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the grid (signed once negative inputs were observed)."""
        return act_grid(self.bits, self.signed)

    def start_observing(self) -> None:
        """Pass inputs through unchanged and collect their statistics."""
        self.observing = True
        self.stats = {"min": float("inf"), "max": float("-inf"), "abs_sum": 0.0, "n": 0}

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Add ``x`` to the statistics; returns ``x`` (detached)."""
        x = x.detach()
        s = self.stats
        s["min"] = min(s["min"], float(x.min()))
        s["max"] = max(s["max"], float(x.max()))
        s["abs_sum"] += float(x.abs().sum())
        s["n"] += x.numel()
        return x

    def finish_observing(self) -> None:
        """Pick the grid's sign and initialise the parameters from the statistics."""
        if not self.stats or not self.stats["n"]:
            raise CompactnnError("no calibration data reached an activation quantizer.")
        self.observing = False
        self.signed = self.stats["min"] < 0
        self.init_from_stats(self.stats)

    def init_from_stats(self, stats: dict[str, float]) -> None:
        """Initialise the method's parameters from ``min``, ``max``, ``abs_sum`` and ``n``."""
        raise NotImplementedError

    def step_size(self) -> torch.Tensor:
        """The grid's scale (a 0-dim tensor)."""
        raise NotImplementedError

    def export(self) -> tuple[QuantSpec, torch.Tensor, torch.Tensor]:
        """``(spec, scale, zero)`` for the frozen layer's ``ActQuantizer``."""
        spec = QuantSpec(bits=self.bits, symmetric=False, granularity="tensor", signed=self.signed)
        scale = fp16(self.step_size().reshape(()).clamp(min=2.0**-14))
        return spec, scale, torch.zeros(())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


class LSQFunction(torch.autograd.Function):
    """``clamp(round(v / s), qn, qp) * s`` with LSQ's gradients; ``s`` broadcasts to ``v``."""

    @staticmethod
    def forward(ctx, v, s, qn: int, qp: int, g: float):
        r = v / s
        ctx.save_for_backward(r, s)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return torch.clamp(torch.round(r), qn, qp) * s

    @staticmethod
    def backward(ctx, grad):
        r, s = ctx.saved_tensors
        below, above = r <= ctx.qn, r >= ctx.qp
        inside = ~(below | above)
        grad_v = grad * inside
        ds = torch.where(below, float(ctx.qn), torch.where(above, float(ctx.qp), r.round() - r))
        grad_s = (grad * ds * ctx.g).sum_to_size(s.shape)
        return grad_v, grad_s, None, None, None


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """LSQ fake quantization (see the module docstring for the gradient).

    Example:
        >>> lsq_quantize(torch.tensor([0.7]), torch.tensor(0.5), -2, 1, 1.0)
        tensor([0.5000])
    """
    return LSQFunction.apply(v, s, qn, qp, g)


def stored_step(step: torch.Tensor) -> torch.Tensor:
    """``|step|`` as the artifact stores it (float16-representable, at least ``2**-14``),
    with the gradient of ``|step|``: training then computes exactly what the frozen layer
    computes. A binary network after an LSQ layer flips signs on the smallest difference."""
    s = step.abs().clamp(min=2.0**-14)
    return s + (fp16(s) - s).detach()


def lsq_grad_scale(numel: int, qp: int) -> float:
    """The step-size gradient scale ``1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qp, 1))


class LSQWeight(nn.Module):
    """Per-output-channel learned step on a symmetric signed ``bits`` grid."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.spec = QuantSpec(bits=bits, symmetric=True, granularity="channel", range_method="mse")
        qt = self.spec.qtype
        self.qn, self.qp = qt.qmin, qt.qmax
        wg = grouped_view(weight.detach().float(), "channel")  # (out, 1, K)
        _, hi = estimate_range(wg, "mse", qt, True)
        step = (hi / max(self.qp, 1)).clamp(min=1e-8)  # (out, 1)
        self.step = nn.Parameter(step.reshape(-1, *([1] * (weight.dim() - 1))))
        self.g = lsq_grad_scale(wg.shape[-1], self.qp)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return lsq_quantize(w, stored_step(self.step), self.qn, self.qp, self.g)

    def export(self, w: torch.Tensor) -> WeightExport:
        """Codes on the float16-rounded per-channel steps."""
        scale = fp16(self.step.abs().clamp(min=2.0**-14)).reshape(-1, 1)  # (out, 1)
        wg = grouped_view(w.detach().float(), "channel")
        codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), self.qn, self.qp)
        codes = codes.reshape(w.shape).to(self.spec.qtype.storage_dtype)
        return WeightExport(codes, scale, torch.zeros_like(scale), self.spec)


class LSQAct(ObservingAct):
    """Per-tensor learned step on the activation entering a layer."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.step = nn.Parameter(torch.ones(()))

    def init_from_stats(self, stats: dict[str, float]) -> None:
        qp = self.grid[1]
        mean_abs = stats["abs_sum"] / stats["n"]
        # the paper's 2 mean|x| / sqrt(Qp), kept at least wide enough to reach 0.9 * max|x|
        reach = 0.9 * max(abs(stats["min"]), abs(stats["max"])) / qp
        init = max(2 * mean_abs / math.sqrt(qp), reach if self.bits >= 8 else 0.0, 1e-6)
        with torch.no_grad():
            self.step.fill_(init)

    def step_size(self) -> torch.Tensor:
        return self.step.detach().abs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return self.observe(x)
        qn, qp = self.grid
        g = lsq_grad_scale(x[0].numel() if x.dim() > 1 else x.numel(), qp)
        return lsq_quantize(x, stored_step(self.step), qn, qp, g)


class STEWeight(nn.Module):
    """Round-to-nearest weights (the recipe's spec) with a straight-through gradient."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = rtn_weight_qparams(w, self.spec)
        cg = grouped_view(codes, self.spec.granularity, self.spec.group_size)
        w_hat = dequantize(cg, scale, zero).reshape(w.shape)
        return w + (w_hat - w).detach()  # min-max grid: nothing is clipped, gradient is 1

    def export(self, w: torch.Tensor) -> WeightExport:
        """The round-to-nearest codes and grid of ``w``."""
        return WeightExport(*rtn_weight_qparams(w, self.spec), self.spec)


def apply_due_stages(quantizer, w: torch.Tensor, epoch: int, epochs: int) -> None:
    """Incremental schedules (INQ, ELQ): run every stage of ``quantizer.portions`` due by
    ``epoch``, the stages spread evenly over ``epochs``.

    The quantizer holds ``portions`` (cumulative fractions frozen per stage), a ``stage``
    buffer (stages done) and ``freeze_portion(w, portion)``.
    """
    for k, portion in enumerate(quantizer.portions):
        due = math.floor(k * epochs / len(quantizer.portions))
        if epoch >= due and int(quantizer.stage) <= k:
            quantizer.freeze_portion(w, portion)
            quantizer.stage.fill_(k + 1)


class EpochMarked(nn.Module):
    """Base of weight quantizers whose ``start_epoch`` re-selects something from the current
    weights (a support, a mask, a codebook, a solve): the buffer ``started`` (the epoch whose
    start was applied, -1: none) is in the training checkpoint, so a run resumed mid-epoch
    keeps that epoch's selection instead of redoing it from weights that moved since.

    Example:
        >>> q = EpochMarked()
        >>> q.begin_epoch(0), q.begin_epoch(0), q.begin_epoch(1)
        (True, False, True)
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("started", torch.full((), -1, dtype=torch.long))

    def begin_epoch(self, epoch: int) -> bool:
        """Mark ``epoch`` started; False when it already was (a resumed run: keep its state)."""
        first = int(self.started) != epoch
        self.started.fill_(epoch)
        return first

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a checkpoint written before ``started`` existed: no epoch marked as started
        state_dict.setdefault(prefix + "started", torch.full((), -1, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
