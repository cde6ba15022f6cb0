"""Sub-bit Neural Networks (Wang, Yao et al., ICCV 2021): binary 3x3 kernels restricted to a
per-layer set of ``2^tau`` patterns, so a kernel costs ``tau`` bits instead of 9.

A binary conv's kernel ``k`` in ``{-1, +1}^9`` (per input channel, per filter) is replaced by
its nearest pattern of the layer's codebook ``P = {p_1 .. p_(2^tau)}``::

    w_hat[o, i] = alpha_o * p_(c(o, i)),   c(o, i) = argmax_p <w[o, i], p>,
    alpha_o = mean |w[o]|   (float16, as the 1-bit layers of the project store it)

``argmax <w, p>`` is the nearest pattern in the scaled-L2 sense (and in Hamming distance for
``sign(w)``). The codebook is selected as the paper does, by pattern frequency: the ``2^tau``
most frequent sign patterns of the layer's current kernels, re-selected at the start of each
training epoch; in between, every kernel is assigned to its nearest pattern and the
gradient reaches the latent weights straight through (clipped at ``|w| <= 1``).

Frozen by the training-aware engine, a layer is a standard 1-bit codebook layer (codes
``p > 0``, levels ``+-alpha``) whose kernels all lie in the codebook; :func:`to_subbit` then
stores it at its real size (:class:`SubbitConv2d`): the ``2^tau`` 9-bit patterns bit-packed,
a ``tau``-bit index per kernel bit-packed, float16 ``alpha`` per filter. Applied to a model
trained with plain binary weights, :func:`to_subbit` is the post-hoc mapping baseline.
Activations: LSQ at ``act.bits`` (8 by default); 1-bit activations need the binary blocks'
seam (not yet wired). Only 3x3 convs go below one bit; other layers use binary weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.modules import saved_layers, set_module
from compactnn.core.packing import pack_codes, packed_nbytes, unpack_codes
from compactnn.core.qlayers import ActQuantizer, QuantConv2d
from compactnn.core.qtype import QType
from compactnn.core.spec import QuantSpec
from compactnn.engines.binary import BinaryWeight
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import EpochMarked, WeightExport, fp16
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.quant.base import short_act_spec
from compactnn.registry import register, register_artifact_hook

EXTRA_KEY = "subbit_layers"  # header extra: layer name -> {"tau", "act_spec"}
BIT = QType(1, signed=False)


def kernel_rows(w: torch.Tensor) -> torch.Tensor:
    """``(out * in, 9)``: the 3x3 kernels of a conv weight ``(out, in, 3, 3)``."""
    return w.reshape(-1, 9)


def frequent_patterns(signs: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` most frequent sign patterns (``x > 0``) of rows ``(n, 9)``, as ``{-1, +1}``
    (ties: the smaller pattern number); padded with unused patterns when fewer exist."""
    ids = ((signs > 0).long() * (1 << torch.arange(8, -1, -1, device=signs.device))).sum(1)
    freq = (
        torch.bincount(ids, minlength=512).double() - torch.arange(512, device=signs.device) * 1e-6
    )
    top = freq.argsort(descending=True)[:count]
    return (
        (top.unsqueeze(1) >> torch.arange(8, -1, -1, device=top.device)) & 1
    ).float() * 2 - 1  # (count, 9)


def nearest_pattern(kernels: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """``(n,)`` index of the pattern with the largest inner product with each kernel."""
    return (kernels @ patterns.T).argmax(1)


class SubbitWeight(EpochMarked):
    """Binary 3x3 kernels restricted to the layer's ``2^tau`` patterns (training and export)."""

    spec = QuantSpec(bits=1, symmetric=False, granularity="channel")

    def __init__(self, weight: torch.Tensor, tau: int) -> None:
        super().__init__()
        self.tau = tau
        self.register_buffer("patterns", self.select(weight))

    def select(self, w: torch.Tensor) -> torch.Tensor:
        return frequent_patterns(kernel_rows(w.detach()), 2**self.tau)

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        """Re-select the codebook from the kernels' current sign patterns (once per epoch:
        again for the epoch already started, as on resuming, it does nothing)."""
        if self.begin_epoch(epoch):
            self.patterns.copy_(self.select(w))

    def quantized(self, w: torch.Tensor) -> torch.Tensor:
        kernels = kernel_rows(w.detach())
        signs = self.patterns[nearest_pattern(kernels, self.patterns)].reshape(w.shape)
        return signs

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
        alpha = alpha + (fp16(alpha) - alpha).detach()
        signs = self.quantized(w)
        ste = w.clamp(-1, 1)
        return alpha * (ste + (signs - ste).detach())

    def export(self, w: torch.Tensor) -> WeightExport:
        w = w.detach().float()
        alpha = w.abs().reshape(w.shape[0], -1).mean(dim=1)
        levels = fp16(torch.stack([-alpha, alpha], dim=-1)).reshape(-1, 1, 2)
        codes = (self.quantized(w) > 0).to(torch.uint8)
        ones = torch.ones(w.shape[0], 1)
        return WeightExport(codes, ones, torch.zeros_like(ones), self.spec, levels)


@dataclass(frozen=True)
class SubbitConfig(QATConfig):
    """Sub-bit binary weights: 3x3 kernels from ``2^tau`` patterns per layer (``w1a8-subbit``).

    Defaults: 1-bit weights, 8-bit LSQ activations, 6 epochs, lr 1e-3, no distillation (the
    binary recipes' schedule, so ``w1a8-xnor`` is the like-for-like baseline); first and last
    layers at 8 bits.

    Args:
        tau: bits per 3x3 kernel, 4..8 (``tau / 9`` bits per weight; 6: 0.67).
    """

    weight: QuantSpec = field(default_factory=lambda: SubbitWeight.spec)
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(8))
    epochs: int = 6
    tau: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight.bits != 1:
            raise CompactnnError(f"subbit: weights are binary (w1-...), not {self.weight.bits}.")
        if self.act is not None and self.act.bits == 1:
            raise CompactnnError("subbit: 1-bit activations are not supported yet; use a8.")
        if not isinstance(self.tau, int) or not 4 <= self.tau <= 8:
            raise CompactnnError(f"subbit: tau={self.tau!r} must be an integer in 4..8.")


def is_3x3(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (3, 3)


def subbit_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: SubbitConfig):
    """Engine hook: sub-bit kernels on 3x3 convs, binary weights elsewhere."""
    return SubbitWeight(layer.weight, config.tau) if is_3x3(layer) else BinaryWeight()


register("subbit", SubbitConfig, "Sub-bit NN: binary 3x3 kernels from 2^tau patterns")(
    QATMethod(subbit_weight_quantizer)
)


class SubbitConv2d(nn.Module):
    """A 3x3 conv stored at ``tau / 9`` bits per weight: packed codebook and indices.

    Buffers (all saved as they are): ``patterns`` (``ceil(2^tau * 9 / 8)`` bytes),
    ``indices`` (``ceil(out * in * tau / 8)`` bytes), ``alpha`` (float16, per filter),
    and the input quantizer's grid. The weight is decoded on each call.
    """

    def __init__(self, conv: nn.Conv2d, tau: int, act_spec: QuantSpec | None) -> None:
        super().__init__()
        self.tau, self.shape = tau, tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups
        nk = self.shape[0] * self.shape[1]
        self.register_buffer(
            "patterns", torch.zeros(packed_nbytes(2**tau * 9, 1), dtype=torch.uint8)
        )
        self.register_buffer("indices", torch.zeros(packed_nbytes(nk, tau), dtype=torch.uint8))
        self.register_buffer("alpha", torch.zeros(self.shape[0], dtype=torch.float16))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.input_quantizer = ActQuantizer(act_spec) if act_spec is not None else None

    def codebook(self) -> torch.Tensor:
        """``(2^tau, 9)`` patterns in ``{-1, +1}``."""
        bits = unpack_codes(self.patterns, BIT, (2**self.tau, 9))
        return bits.float() * 2 - 1

    def kernel_indices(self) -> torch.Tensor:
        qt = QType(self.tau, signed=False)
        return unpack_codes(self.indices, qt, (self.shape[0] * self.shape[1],)).long()

    def decoded_weight(self) -> torch.Tensor:
        signs = self.codebook()[self.kernel_indices()].reshape(self.shape)
        return self.alpha.float().reshape(-1, 1, 1, 1) * signs

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.input_quantizer is not None:  # a loaded grid is a calibrated one
            self.input_quantizer.calibrated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.decoded_weight()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def subbit_layer(q: QuantConv2d, tau: int) -> SubbitConv2d:
    """The :class:`SubbitConv2d` of a frozen binary 3x3 layer: kernels mapped to the ``2^tau``
    most frequent patterns (exact when the layer was trained with sub-bit kernels)."""
    levels = getattr(q, "weight_levels", None)
    if (
        q.weight_spec.bits != 1
        or levels is None
        or not torch.equal(levels[..., 0], -levels[..., 1])
    ):
        raise CompactnnError("to_subbit: a layer is not binary with +-alpha levels (w1 recipes).")
    signs = kernel_rows(q.weight_codes.float() * 2 - 1)
    patterns = frequent_patterns(signs, 2**tau)
    idx = nearest_pattern(signs, patterns)
    aspec = q.input_quantizer.spec if q.input_quantizer is not None else None
    out = SubbitConv2d(q, tau, aspec)
    out.patterns.copy_(pack_codes((patterns > 0).to(torch.uint8), BIT))
    out.indices.copy_(pack_codes(idx.to(torch.uint8), QType(tau, signed=False)))
    out.alpha.copy_(levels[:, 0, 1].to(torch.float16))
    if aspec is not None:
        out.input_quantizer.set_qparams(q.input_quantizer.scale, q.input_quantizer.zero)
    return out


def to_subbit(model: nn.Module, tau: int | None = None, *, force: bool = False) -> nn.Module:
    """Store every binary 3x3 conv of a frozen model at ``tau`` bits per kernel (in place).

    Args:
        model: a frozen model with binary 3x3 convs (``w1a8-subbit``, or a 1-bit recipe for
            the post-hoc mapping baseline).
        tau: bits per kernel, 4..8. None: the ``tau`` the model was trained with (its
            recipe's ``subbit`` step); required for a model trained without one.
        force: allow a ``tau`` other than the trained one. Smaller, each layer keeps only its
            ``2^tau`` most frequent patterns and the outputs change (an untrained mapping);
            larger, the same patterns are stored at more bits per kernel.

    Example:
        >>> small = to_subbit(compactnn.train(model, "w1a8-subbit", data))  # doctest: +SKIP
    """
    tau = _checked_tau(model, tau, force)
    layers: dict[str, dict] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantConv2d) and m.weight_spec.bits == 1 and is_3x3(m):
            sub = subbit_layer(m, tau)
            set_module(model, name, sub)
            aq = sub.input_quantizer
            spec = aq.spec.to_dict() if aq else None
            layers[name] = {"tau": tau, "act_spec": spec, "bias": sub.bias is not None}
    info = getattr(model, "_compactnn", None)
    if info is not None:
        info.setdefault("extra", {}).setdefault(EXTRA_KEY, {}).update(layers)
    return model


def trained_tau(model: nn.Module) -> tuple[int, str] | None:
    """``(tau, recipe name)`` of the ``subbit`` step ``model`` was trained (or compressed)
    with, or None when its recipe has none (or several with different ``tau``)."""
    recipe = (getattr(model, "_compactnn", None) or {}).get("recipe")
    steps = getattr(recipe, "steps", ())
    taus = {s.config.tau for s in steps if s.method == "subbit"}
    return (taus.pop(), recipe.name) if len(taus) == 1 else None


def _checked_tau(model: nn.Module, tau: int | None, force: bool) -> int:
    """The ``tau`` to store ``model`` at: the trained one unless ``force`` allows another."""
    trained = trained_tau(model)
    if tau is None:
        if trained is None:
            raise CompactnnError(
                "to_subbit: this model was not trained with sub-bit kernels (no 'subbit' step "
                "in its recipe): pass tau= (4..8) for the post-hoc mapping of its binary 3x3 "
                "convs to 2^tau patterns per layer."
            )
        return trained[0]
    if isinstance(tau, bool) or not isinstance(tau, int) or not 4 <= tau <= 8:
        raise CompactnnError(f"to_subbit: tau={tau!r} must be an integer in 4..8.")
    if trained is None or tau == trained[0] or force:
        return tau
    t, recipe = trained
    what = f"this model was trained with {recipe!r} at tau={t} (at most {2**t} patterns per layer)"
    if tau < t:
        change = (
            f"tau={tau} keeps only each layer's {2**tau} most frequent patterns and maps every "
            "other kernel to its nearest one: the outputs change (an untrained mapping)"
        )
    else:
        change = (
            f"tau={tau} stores {tau} bits per kernel instead of {t} for the same patterns: a "
            "larger artifact, the same outputs"
        )
    raise CompactnnError(
        f"to_subbit: {what}; {change}. For the trained form call to_subbit(model) (or tau={t}); "
        f"to train at tau={tau}: compactnn.train(model, Recipe('w1a8-subbit-tau{tau}', "
        f"(Step('subbit', SubbitConfig(tau={tau})),)), data); force=True maps it anyway."
    )


@register_artifact_hook("before_layers")
def restore_subbit(model: nn.Module, extra: dict) -> None:
    """At ``load``: each recorded 3x3 conv of the skeleton becomes an empty SubbitConv2d."""
    for name, where, layer, entry in saved_layers(model, extra, EXTRA_KEY):
        tau = entry.get("tau") if isinstance(entry, dict) else None
        ok = isinstance(tau, int) and not isinstance(tau, bool) and 4 <= tau <= 8
        if layer is None or not is_3x3(layer) or not ok or not isinstance(entry.get("bias"), bool):
            raise ArtifactError(f"{where} names no 3x3 conv of the skeleton with tau in 4..8.")
        aspec = entry.get("act_spec")
        aspec = QuantSpec.from_dict(aspec) if aspec is not None else None
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, 3, layer.stride, layer.padding,
                         layer.dilation, layer.groups, bias=entry["bias"])  # fmt: skip
        set_module(model, name, SubbitConv2d(conv, tau, aspec))
