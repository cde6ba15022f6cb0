"""The reconstruction engine, shared by AdaRound, BRECQ and QDrop.

A *unit* is what one optimisation reconstructs: a single layer (AdaRound) or a block of
layers such as a residual block (BRECQ, QDrop). For each unit, in execution order:

1. cache the unit's input as the partly quantized model produces it (earlier units already
   hold their final integer weights), and the float model's output of the same unit;
2. learn each weight's rounding (up or down) so the unit's output matches the float one,
   optionally learning the activation step sizes jointly (LSQ-style);
3. write the hard integer codes and step sizes back into the quantized layers.

Only one unit's inputs and float outputs are held at a time, so memory stays bounded by the
largest activation times the number of calibration samples.

Hook interface (:class:`ReconHooks`), the method's strategy::

    rounder(qlayer, float_weight) -> AdaRoundWeight-like   # learnable rounding of a layer
    act_quantizer(calibrated ActQuantizer) -> module       # LSQ steps / QDrop dropping
    mix_inputs(q_in, fp_in, gen) -> unit input             # QDrop: float and quantized mixed

:func:`recon_hooks` builds them from a :class:`ReconConfig`'s ``learn_act`` and ``drop_prob``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from compactnn.core.capture import capture_batches
from compactnn.core.context import CompressContext
from compactnn.core.qlayers import ActQuantizer
from compactnn.core.quantize import grouped_view, round_scale
from compactnn.engines.layerwise import quantize_all_rtn
from compactnn.errors import CompactnnError
from compactnn.quant.base import QuantConfig

# Rectified sigmoid stretch of AdaRound (Nagel et al. 2020, eq. 23).
ZETA, GAMMA = 1.1, -0.1
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclasses.dataclass(frozen=True)
class ReconConfig(QuantConfig):
    """Settings shared by the reconstruction methods (subclasses change the defaults).

    Args:
        iters: optimisation steps per unit (layer or block).
        batch_size: calibration samples per step.
        lr: Adam learning rate of the rounding logits.
        act_lr: Adam learning rate of the activation step sizes (``learn_act``).
        round_weight: weight of the rounding regulariser that pushes h(V) to 0 or 1.
        beta_start, beta_end: annealing range of the regulariser's exponent.
        warmup: fraction of ``iters`` spent on the output loss alone.
        unit: ``"layer"`` (one layer at a time) or ``"block"`` (residual blocks); called
            ``granularity`` before (still read), renamed so it is not confused with
            :attr:`QuantSpec.granularity`.
        max_block_layers: a module with more quantized layers than this is split further.
        learn_act: learn activation step sizes jointly with the rounding.
        drop_prob: probability of keeping an activation in float during reconstruction
            (QDrop); 0 disables it.
        num_samples: calibration samples recommended (fewer gives a warning; all given are
            used).
    """

    needs_calibration: ClassVar[bool] = True

    config_version: ClassVar[int] = 2  # 2: ``granularity`` renamed ``unit``
    renamed_fields: ClassVar[dict[str, str]] = {"granularity": "unit"}

    iters: int = 500
    batch_size: int = 32
    lr: float = 1e-2
    act_lr: float = 1e-3
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    unit: str = "block"
    max_block_layers: int = 4
    learn_act: bool = False
    drop_prob: float = 0.0
    num_samples: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.unit not in ("layer", "block"):
            raise CompactnnError(f"{name}.unit={self.unit!r}: use layer or block.")
        for f in ("iters", "batch_size", "max_block_layers", "num_samples"):
            if int(getattr(self, f)) < 1:
                raise CompactnnError(f"{name}.{f}={getattr(self, f)} must be at least 1.")
        if not 0.0 <= self.drop_prob < 1.0:
            raise CompactnnError(f"{name}.drop_prob={self.drop_prob} must lie in [0, 1).")
        if not 0.0 <= self.warmup < 1.0:
            raise CompactnnError(f"{name}.warmup={self.warmup} must lie in [0, 1).")

    @classmethod
    def from_short(cls, wbits, abits, group, range_method: str = "mse", **kwargs):
        """Like :meth:`QuantConfig.from_short`, but ranges start from an MSE search."""
        return super().from_short(wbits, abits, group, range_method=range_method, **kwargs)


class NotReconstructable(Exception):
    """A unit whose inputs or outputs are not plain batch tensors."""


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) of AdaRound: a stretched sigmoid clipped to [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_logits(rest: torch.Tensor) -> torch.Tensor:
    """Logits V with h(V) equal to ``rest`` (the fractional part of w / s)."""
    rest = rest.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


class AdaRoundWeight:
    """Learnable rounding of one quantized layer's weight.

    Holds ``floor(w / s)`` in the grouped view ``(rows, ngroups, G)`` and logits ``V`` of the
    same shape; the code of each weight is ``floor + h(V) + zero`` clamped to the grid, so it
    can only land on the floor or the ceiling of ``w / s``.
    """

    def __init__(self, qlayer: nn.Module, float_weight: torch.Tensor) -> None:
        spec = qlayer.weight_spec
        self.layer = qlayer
        self.qtype = spec.qtype
        wg = grouped_view(float_weight.detach().float(), spec.granularity, spec.group_size)
        self.scale = qlayer.weight_scale.unsqueeze(-1).clone()  # (rows, ngroups, 1)
        self.zero = qlayer.weight_zero.unsqueeze(-1).clone()
        ratio = wg / self.scale
        self.floor = torch.floor(ratio)
        self.logits = nn.Parameter(init_logits(ratio - self.floor))

    def soft_weight(self) -> torch.Tensor:
        """Dequantized weight with soft rounding, in the layer's weight shape."""
        q = self.floor + rectified_sigmoid(self.logits) + self.zero
        q = torch.clamp(q, self.qtype.qmin, self.qtype.qmax)
        return ((q - self.zero) * self.scale).reshape(self.layer.weight.shape)

    def hard_codes(self) -> torch.Tensor:
        """Integer codes: floor plus one where h(V) > 0.5, clamped to the grid."""
        up = (rectified_sigmoid(self.logits.detach()) > 0.5).float()
        return torch.clamp(self.floor + up + self.zero, self.qtype.qmin, self.qtype.qmax)

    def regulariser(self, beta: float) -> torch.Tensor:
        """Sum of ``1 - |2h - 1|^beta``: zero only when every h is exactly 0 or 1."""
        h = rectified_sigmoid(self.logits)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    def commit(self) -> None:
        self.layer.set_quantized_weight(
            self.hard_codes(), self.scale.squeeze(-1), self.zero.squeeze(-1)
        )


class LSQActQuantizer(nn.Module):
    """Per-tensor activation fake quantization with a learnable step (LSQ, Esser et al.).

    ``round`` passes gradients straight through, so the step size gets the LSQ gradient.
    With ``drop_prob > 0`` each element keeps its float value with that probability while
    training (QDrop).
    """

    def __init__(self, base: ActQuantizer, drop_prob: float) -> None:
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(base.scale.detach().clone())
        self.register_buffer("zero", base.zero.detach().clone())
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qt = self.base.qtype
        s = self.scale.abs() + 1e-8
        ratio = x / s
        q = ratio + (torch.round(ratio) - ratio).detach() + self.zero
        xq = (torch.clamp(q, qt.qmin, qt.qmax) - self.zero) * s
        if self.training and self.drop_prob > 0:
            keep = torch.rand_like(x) < self.drop_prob
            xq = torch.where(keep, x, xq)
        return xq

    def commit(self) -> None:
        self.base.set_qparams(round_scale(self.scale.detach().abs()), self.zero)


def call_counts(model: nn.Module, ctx: CompressContext) -> dict[str, int]:
    """How often each named module runs on the first calibration batch."""
    counts: dict[str, int] = {}
    hooks = []
    for n, m in model.named_modules():

        def hook(_m, _a, n=n):
            counts[n] = counts.get(n, 0) + 1

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            ctx.run(model, ctx.batches[0])
    finally:
        for h in hooks:
            h.remove()
    return counts


def find_units(
    model: nn.Module, names: list[str], config: ReconConfig, ctx: CompressContext, method: str
) -> list[tuple[str, list[str]]]:
    """Units ``(module name, quantized layer names inside)`` in execution order.

    With ``unit="block"`` a unit is the outermost non-container module that holds at
    most ``max_block_layers`` quantized layers and runs exactly once per forward; layers
    outside any block are their own units.
    """
    if config.unit == "layer":
        return [(n, [n]) for n in names]
    counts = call_counts(model, ctx)
    wanted = set(names)
    units: list[tuple[str, list[str]]] = []

    def visit(name: str, module: nn.Module) -> None:
        inside = [n for n in names if not name or n == name or n.startswith(name + ".")]
        if not inside:
            return
        if name in wanted:
            units.append((name, [name]))
            return
        is_block = name and not isinstance(module, CONTAINERS) and counts.get(name) == 1
        if is_block and len(inside) <= config.max_block_layers:
            units.append((name, inside))
            return
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", model)
    order = {n: i for i, n in enumerate(names)}
    units.sort(key=lambda u: min(order[n] for n in u[1]))
    if all(len(u[1]) == 1 for u in units):
        ctx.notes.append(
            f"{method}: no block of several quantized layers was found; reconstructing "
            "layer by layer."
        )
    return units


def capture(model: nn.Module, name: str, ctx: CompressContext, what: str) -> torch.Tensor:
    """The input (``what="input"``) or output of module ``name`` over all calibration batches.

    Returns a ``(N, ...)`` tensor; each forward pass stops as soon as it is captured.

    Raises:
        NotReconstructable: the module takes or returns anything but one batch tensor.

    Example:
        >>> capture(model, "block", ctx, "input").shape  # doctest: +SKIP
        torch.Size([128, 8, 8, 8])
    """
    chunks: list[torch.Tensor] = []

    def keep(value, kwargs) -> None:
        if kwargs or not isinstance(value, torch.Tensor):
            raise NotReconstructable(f"{name} does not take and return one tensor")
        chunks.append(value.detach().float())

    # the input is taken before the module runs (an in-place op inside must not change it)
    def pre_hook(_m, args, kwargs):
        keep(args[0] if len(args) == 1 else None, kwargs)

    def hook(_m, _args, kwargs, out):
        keep(out, kwargs)

    module = model.get_submodule(name)
    output = what != "input"
    capture_batches(model, module, ctx, hook if output else pre_hook, output, with_kwargs=True)
    if len(chunks) != len(ctx.batches):
        raise NotReconstructable(f"{name} did not run on every calibration batch")
    return torch.cat(chunks)


def beta_at(step: int, config: ReconConfig) -> float | None:
    """Exponent of the rounding regulariser, decayed linearly; None during warm-up."""
    start = config.warmup * config.iters
    if step < start:
        return None
    t = (step - start) / max(config.iters - start, 1)
    return config.beta_end + (config.beta_start - config.beta_end) * max(0.0, 1.0 - t)


def drop_inputs(
    drop_prob: float,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]:
    """QDrop's input mixing: each element of the unit's input is the float one with
    probability ``drop_prob``, the quantized one otherwise.

    Example:
        >>> mix = drop_inputs(0.5)
        >>> mix(torch.zeros(4), torch.ones(4), torch.Generator().manual_seed(0)).shape
        torch.Size([4])
    """

    def mix(q_in: torch.Tensor, fp_in: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.where(torch.rand(q_in.shape, generator=gen) < drop_prob, fp_in, q_in)

    return mix


@dataclasses.dataclass(frozen=True)
class ReconHooks:
    """A reconstruction method's strategy (see the module docstring).

    Args:
        method: the method's name, in notes, progress and the calibration warning.
        rounder: ``rounder(qlayer, float_weight)``, the learnable rounding of one layer:
            ``logits`` (trained), ``soft_weight()``, ``regulariser(beta)``, ``commit()``.
        act_quantizer: wraps each calibrated input quantizer of the unit's layers while it
            is reconstructed (must have ``scale`` and ``commit()`` when ``learn_act``); None
            keeps the calibrated quantizers.
        learn_act: train the wrapped quantizers' step sizes and write them back.
        mix_inputs: ``mix(q_in, fp_in, gen)``, the unit's training input from its quantized
            and float inputs; None trains on the quantized inputs (float ones not captured).
    """

    method: str
    rounder: Callable[[nn.Module, torch.Tensor], AdaRoundWeight] = AdaRoundWeight
    act_quantizer: Callable[[ActQuantizer], nn.Module] | None = None
    learn_act: bool = False
    mix_inputs: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None


def recon_hooks(config: ReconConfig, method: str) -> ReconHooks:
    """AdaRound rounding, plus what ``config`` asks for: learned activation steps
    (``learn_act``) and QDrop's dropping (``drop_prob > 0``, in the quantizers and the unit's
    input).

    Example:
        >>> recon_hooks(ReconConfig(drop_prob=0.5), "qdrop").mix_inputs is not None
        True
    """
    dropping = config.drop_prob > 0
    wrap = config.learn_act or dropping
    return ReconHooks(
        method,
        act_quantizer=functools.partial(LSQActQuantizer, drop_prob=config.drop_prob)
        if wrap
        else None,
        learn_act=config.learn_act,
        mix_inputs=drop_inputs(config.drop_prob) if dropping else None,
    )


def _swap_act_quantizers(
    model: nn.Module, names: list[str], hooks: ReconHooks
) -> dict[str, nn.Module]:
    """Put the hooks' (learnable, droppable) quantizer in front of each layer."""
    swapped = {}
    if hooks.act_quantizer is None:
        return swapped
    for n in names:
        layer = model.get_submodule(n)
        aq = layer.input_quantizer
        if aq is not None and aq.calibrated and not getattr(aq, "runtime_range", False):
            swapped[n] = hooks.act_quantizer(layer.input_quantizer)
            layer.input_quantizer = swapped[n]
    return swapped


def _optimise(
    module: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    rounders: dict[str, AdaRoundWeight],
    keys: dict[str, str],
    lsq: dict[str, nn.Module],
    config: ReconConfig,
    hooks: ReconHooks,
    gen: torch.Generator,
) -> bool:
    """Adam on the rounding logits (and step sizes); returns whether the steps were learned."""
    q_in, fp_out, fp_in = data
    opt = torch.optim.Adam([r.logits for r in rounders.values()], lr=config.lr)
    act_opt = sched = None
    if hooks.learn_act and lsq:
        act_opt = torch.optim.Adam([q.scale for q in lsq.values()], lr=config.act_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, T_max=config.iters)
    n = q_in.shape[0]
    for step in range(config.iters):
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=gen)
        x = q_in[idx]
        if fp_in is not None:
            x = hooks.mix_inputs(x, fp_in[idx], gen)
        weights = {keys[k]: r.soft_weight() for k, r in rounders.items()}
        out = functional_call(module, weights, (x,))
        loss = (out - fp_out[idx]).pow(2).flatten(1).sum(1).mean()
        beta = beta_at(step, config)
        if beta is not None:
            loss = loss + config.round_weight * sum(r.regulariser(beta) for r in rounders.values())
        opt.zero_grad()
        if act_opt is not None:
            act_opt.zero_grad()
        loss.backward()
        opt.step()
        if act_opt is not None:
            act_opt.step()
            sched.step()
    return act_opt is not None


def reconstruct_unit(
    model: nn.Module,
    fp_model: nn.Module,
    unit: tuple[str, list[str]],
    config: ReconConfig,
    hooks: ReconHooks,
    ctx: CompressContext,
    gen: torch.Generator,
) -> None:
    """Learn the rounding (and step sizes) of one unit, then write them into its layers."""
    name, layers = unit
    q_in = capture(model, name, ctx, "input")  # (N, ...) as the quantized model feeds it
    fp_out = capture(fp_model, name, ctx, "output")  # (N, ...) float target
    mixing = hooks.mix_inputs is not None
    fp_in = capture(fp_model, name, ctx, "input") if mixing else None
    keys = {n: n.removeprefix(name + ".") + ".weight" if n != name else "weight" for n in layers}
    rounders = {
        n: hooks.rounder(model.get_submodule(n), fp_model.get_submodule(n).weight) for n in layers
    }
    lsq = _swap_act_quantizers(model, layers, hooks)
    module = model.get_submodule(name)
    try:
        learned = _optimise(module, (q_in, fp_out, fp_in), rounders, keys, lsq, config, hooks, gen)
    finally:
        for k, q in lsq.items():
            model.get_submodule(k).input_quantizer = q.base
    with torch.no_grad():
        for r in rounders.values():
            r.commit()
        if learned:
            for q in lsq.values():
                q.commit()


def reconstruct(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: ReconConfig,
    ctx: CompressContext,
    hooks: ReconHooks,
) -> nn.Module:
    """Quantize ``targets`` of ``model`` (in place) and reconstruct them unit by unit.

    Units that cannot be reconstructed keep their round-to-nearest weights; each such
    fallback is listed in ``ctx.notes``.

    Args:
        model: the model (already a copy), changed in place.
        targets: name -> module chosen by the step.
        config: specs, units (``unit``, ``max_block_layers``) and optimisation
            settings.
        ctx: calibration batches and bookkeeping.
        hooks: the method's strategy (:func:`recon_hooks` for a config's own).

    Example:
        >>> reconstruct(model, targets, cfg, ctx, recon_hooks(cfg, "brecq"))  # doctest: +SKIP
    """
    method = hooks.method
    ctx.require_calibration(method, config.num_samples)
    fp_model, names = quantize_all_rtn(model, targets, config, ctx)
    if not names:
        return model
    units = find_units(model, names, config, ctx, method)
    gen = torch.Generator().manual_seed(ctx.seed)
    bar = ctx.bar(units, desc=f"{method}: reconstructing")
    for unit in bar:
        bar.set_postfix_str(unit[0])
        todo = [unit]
        while todo:
            current = todo.pop(0)
            try:
                reconstruct_unit(model, fp_model, current, config, hooks, ctx, gen)
            except NotReconstructable as exc:
                if len(current[1]) > 1:
                    ctx.notes.append(
                        f"{method}: block {current[0]} cannot be reconstructed as a block "
                        f"({exc}); reconstructing its layers one by one."
                    )
                    todo.extend((n, [n]) for n in current[1])
                else:
                    ctx.notes.append(
                        f"{method}: {current[0]} cannot be reconstructed ({exc}); it keeps "
                        "round-to-nearest weights."
                    )
    return model
