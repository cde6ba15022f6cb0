"""Binary augmented pruning (Wang et al., "Extremely sparse networks via binary augmented
pruning for fast image classification", TNNLS 2021): a binary branch plus an extremely sparse
float (or 8-bit) branch per layer.

Each layer's weight is the sum of a binary branch with one scale per output filter and a
sparse branch ``S`` that holds the few weights the binary branch gets most wrong::

    W_hat = alpha * B + S,      B = sign(W) in {-1, +1},      nnz(S) = k = round(d * numel)

Support (re-selected at the start of each of the first epochs, then frozen): the ``k`` entries
of the layer with the largest residual of the plain binary approximation,
``r = |W - alpha_0 * B|`` with ``alpha_0 = mean|W|`` per filter (XNOR-Net's scale). Given the
support ``M``, the binary scale is the least-squares one of the entries the binary branch
carries alone, and ``S`` is the residual on the support::

    alpha_o = mean_{j not in M} |W_oj|,        S = M * (W - alpha * B)

so ``W_hat = W`` exactly on the support (up to the storage of ``S``: float16, or 8-bit codes
with one scale per filter). Training: straight-through sign (clipped at ``|w| <= 1``) off the
support, identity on it (``dW_hat / dW = 1``), and the gradient of ``alpha`` through the
off-support ``|W|``, as XNOR-Net's. ``alpha`` is rounded to float16 as the artifact stores it.

Frozen, a layer is a :class:`BAPLayer`: a standard 1-bit codebook layer ``.binary`` (codes
``[W >= 0]``, levels ``[-alpha, +alpha]``, the input quantizer) and the sparse branch as a
float16 buffer ``sparse_values`` of the weight's shape (mostly zeros: the artifact's sparse
encoder stores only its non-zeros' positions and values) or, with 8-bit values, an int8
quantized twin ``.sparse`` (codes zero almost everywhere, stored sparse the same way).
The artifact header lists the layers (``extra["bap_layers"]``) and :func:`restore_bap`
rebuilds them at load time. Loads bit-exactly.

The paper's training schedule, scale granularity and value format were not available (method
card A6); the support rule, the least-squares ``alpha`` and the schedule above are this
toolkit's reading. Recipes: ``w1a8-bap`` (2 % of each layer's weights in the float16 branch),
``w1a8-bap-sp99`` (99 % sparse float branch), ``w1-bap-sp98-int8`` (weight-only, 8-bit values).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.context import CompressContext
from compactnn.core.modules import move_hooks, saved_layers, set_module
from compactnn.core.qlayers import make_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.engines.binary import sign_ste
from compactnn.engines.qat import QATConfig, QATLayer, QATMethod
from compactnn.engines.qat_quantizers import EpochMarked, WeightExport, fp16
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.quant.base import short_act_spec, short_weight_spec
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_artifact_hook, register_short_name

EXTRA_KEY = "bap_layers"  # header extra: layer name -> {"values": "float16" | "int8"}
BINARY_SPEC = QuantSpec(bits=1, symmetric=False, granularity="channel")
INT8_SPEC = QuantSpec(bits=8, symmetric=True, granularity="channel")
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class BAPConfig(QATConfig):
    """Binary augmented pruning (recipes ``w1a8-bap``, ``w1a8-bap-sp<P>[-int8]``).

    Defaults: 1-bit weights plus a 2 % sparse float16 branch, 8-bit LSQ activations, 6 epochs,
    lr 1e-3 (the binary recipes' schedule, so ``w1a8-xnor`` is the like-for-like baseline);
    first and last layers at 8 bits (LSQ, no sparse branch).

    Args:
        density: share of each layer's weights in the sparse branch, in (0, 0.5]
            (0.02: the paper's "98 % sparsity" of the float network).
        value_bits: the sparse branch's values: 16 (float16) or 8 (int8, one scale per
            output filter).
        reselect_fraction: the support is re-selected at the start of each epoch below
            ``ceil(reselect_fraction * epochs)`` (always at the first), then kept.
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(1))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(8))
    epochs: int = 6
    density: float = 0.02
    value_bits: int = 16
    reselect_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight.bits != 1 or self.weight.granularity != "channel":
            raise CompactnnError(
                "bap: the binary branch takes 1-bit weights with one scale per filter "
                f"(w1a8-bap), not {self.weight.bits} bits per {self.weight.granularity}."
            )
        if self.act is not None and self.act.bits == 1:
            raise CompactnnError("bap: 1-bit activations are not supported; use a8 or none.")
        if not 0.0 < self.density <= 0.5:
            raise CompactnnError(f"bap: density={self.density} must lie in (0, 0.5].")
        if self.value_bits not in (8, 16):
            raise CompactnnError(f"bap: value_bits={self.value_bits!r}; use 16 or 8.")
        if not 0.0 <= self.reselect_fraction <= 1.0:
            raise CompactnnError(
                f"bap: reselect_fraction={self.reselect_fraction} must lie in [0, 1]."
            )


def _dims(w: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


def _per_filter(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (w.dim() - 1)))


def sign_codes(w: torch.Tensor) -> torch.Tensor:
    """``B = sign(w)`` in ``{-1, +1}`` (``sign(0) = +1``)."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def residual_support(w: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` entries with the largest ``|w - alpha_0 sign(w)|``,
    ``alpha_0 = mean|w|`` per output filter (ties: ``torch.topk``'s order).

    Example:
        >>> residual_support(torch.tensor([[2.0, 0.5, -0.5]]), 1)  # alpha_0 = 1: r = 1, .5, .5
        tensor([[ True, False, False]])
    """
    w = w.detach().float()
    alpha0 = _per_filter(w.abs().mean(dim=_dims(w)), w)
    r = (w - alpha0 * sign_codes(w)).abs().reshape(-1)
    mask = torch.zeros(r.numel(), dtype=torch.bool, device=w.device)
    if k > 0:
        mask[torch.topk(r, min(k, r.numel())).indices] = True
    return mask.reshape(w.shape)


def support_alpha(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(out,)`` least-squares binary scale given the support: ``mean |w|`` over the entries
    outside ``mask`` (a filter wholly inside the support: ``mean |w|``). Differentiable."""
    off = (~mask).to(w.dtype)
    cnt = off.sum(dim=_dims(w))
    alpha_off = (w.abs() * off).sum(dim=_dims(w)) / cnt.clamp(min=1)
    return torch.where(cnt > 0, alpha_off, w.abs().mean(dim=_dims(w)))


def int8_step(s: torch.Tensor) -> torch.Tensor:
    """``(out,)`` float16-representable step of the 8-bit sparse values: ``max|S_o| / 127``."""
    return fp16((s.detach().abs().amax(dim=_dims(s)) / 127).clamp(min=2.0**-14))


def sparse_values(
    w: torch.Tensor, binary: torch.Tensor, mask: torch.Tensor, value_bits: int
) -> torch.Tensor:
    """``S = mask * (w - binary)`` rounded to its storage (float16, or int8 codes times the
    per-filter step), with gradient 1 to ``w - binary`` on the support."""
    s = (w - binary) * mask
    if value_bits == 16:
        return s + (fp16(s) - s).detach()
    step = _per_filter(int8_step(s), s)
    q = torch.clamp(torch.round(s.detach() / step), -127, 127) * step
    return s + (q - s).detach()


def bap_weight(
    w: torch.Tensor, mask: torch.Tensor, value_bits: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_hat, alpha, S)``: ``W_hat = alpha * sign(w) + S`` (see the module docstring),
    ``alpha`` ``(out,)`` float16-rounded, gradients straight through.

    Example:
        >>> w = torch.tensor([[2.0, 0.5, -0.5]])
        >>> bap_weight(w, residual_support(w, 1))[0]  # alpha = 0.5 off the support, S = 1.5
        tensor([[ 2.0000,  0.5000, -0.5000]])
    """
    alpha = support_alpha(w, mask)
    alpha = alpha + (fp16(alpha) - alpha).detach()
    binary = _per_filter(alpha, w) * sign_ste(w)
    s = sparse_values(w, binary, mask, value_bits)
    return binary + s, alpha, s


class BAPWeight(EpochMarked):
    """The training-aware quantizer of one layer: binary branch plus sparse branch.

    Args:
        weight: the float weight (its initial support is selected from it).
        config: density, value bits, re-selection schedule.
    """

    spec = BINARY_SPEC

    def __init__(self, weight: torch.Tensor, config: BAPConfig) -> None:
        super().__init__()
        self.density, self.value_bits = config.density, config.value_bits
        self.reselect_fraction = config.reselect_fraction
        self.k = max(1, round(config.density * weight.numel()))
        self.register_buffer("mask", residual_support(weight, self.k))

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        """Re-select the support from the current weights while the schedule allows (once
        per epoch: again for the epoch already started, as on resuming, it does nothing)."""
        if not self.begin_epoch(epoch):
            return
        if epoch == 0 or epoch < math.ceil(self.reselect_fraction * epochs):
            self.mask.copy_(residual_support(w, self.k))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return bap_weight(w, self.mask, self.value_bits)[0]

    def export(self, w: torch.Tensor) -> WeightExport:
        """Refused: a standard layer cannot hold the sparse branch (see :class:`BAPLayer`)."""
        raise CompactnnError(
            "bap: this layer must be frozen by its own wrapper (BAPTrainLayer); the "
            "training-aware engine lacks the quantizer 'wrapper' seam (engines/qat.py)."
        )

    def wrapper(self, name: str, layer: nn.Module, aq, ctx: CompressContext) -> QATLayer:
        """Engine seam: the training wrapper of ``layer`` (records the layer for loading)."""
        return BAPTrainLayer(name, layer, self, aq, ctx)

    def frozen_parts(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """``codes`` (uint8 ``[w >= 0]``), ``alpha`` (float16), the sparse branch ``S``
        (float32 values of its storage) and, for int8 values, ``codes8``/``step``."""
        w = w.detach().float()
        with torch.no_grad():
            _, alpha, s = bap_weight(w, self.mask, self.value_bits)
        out = {"codes": (w >= 0).to(torch.uint8), "alpha": alpha.to(torch.float16), "S": s}
        if self.value_bits == 8:
            raw = (w - _per_filter(alpha, w) * sign_codes(w)) * self.mask
            step = int8_step(raw)
            codes8 = torch.clamp(torch.round(raw / _per_filter(step, raw)), -127, 127)
            out.update(codes8=codes8.to(torch.int8), step=step)
        return out


class BAPLayer(nn.Module):
    """A frozen binary augmented layer: ``y = op(q(x), alpha * B + S) + bias``.

    Args:
        binary: a standard 1-bit codebook layer (codes, ``+-alpha`` levels, bias, input grid).
        value_bits: 16 (buffer ``sparse_values``, float16) or 8 (``sparse``: int8 codes).
        sparse: with 8-bit values, the int8 quantized twin holding ``S`` (or a float
            placeholder of its geometry that loading replaces).
    """

    def __init__(self, binary: nn.Module, value_bits: int, sparse: nn.Module | None = None):
        super().__init__()
        self.binary = binary
        self.value_bits = value_bits
        if value_bits == 16:
            shape = binary.weight.shape
            self.register_buffer("sparse_values", torch.zeros(shape, dtype=torch.float16))
        elif sparse is None:
            raise CompactnnError("BAPLayer: 8-bit sparse values need the 'sparse' layer.")
        else:
            self.sparse = sparse

    def sparse_weight(self) -> torch.Tensor:
        """``S`` in float32, the weight's shape."""
        if self.value_bits == 16:
            return self.sparse_values.float()
        return self.sparse.weight

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``alpha * B + S`` (float32, the layer's shape)."""
        return self.binary.weight + self.sparse_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantize = getattr(self.binary, "quantize_input", None)  # absent on a float twin
        if quantize is not None:
            x = quantize(x)
        if isinstance(self.binary, nn.Linear):
            return F.linear(x, self.weight, self.binary.bias)
        return self.binary._conv_forward(x, self.weight, self.binary.bias)


class BAPTrainLayer(QATLayer):
    """The training wrapper: ``QATLayer`` whose freeze builds a :class:`BAPLayer`."""

    def __init__(
        self, name: str, layer: nn.Module, wq: BAPWeight, aq, ctx: CompressContext
    ) -> None:
        super().__init__(layer, wq, aq)
        values = "float16" if wq.value_bits == 16 else "int8"
        ctx.extra.setdefault(EXTRA_KEY, {})[name] = {"values": values}

    def freeze(self) -> nn.Module:
        wq, aq = self.weight_quantizer, self.input_quantizer
        parts = wq.frozen_parts(self.layer.weight)
        aspec = qparams = None
        if aq is not None:
            aspec, *qparams = aq.export()
        binary = make_quant_layer(self.layer, BINARY_SPEC, aspec)
        alpha = parts["alpha"].float()
        binary.set_codebook(torch.stack([-alpha, alpha], dim=-1).reshape(-1, 1, 2))
        ones = torch.ones(alpha.shape[0], 1)
        binary.set_quantized_weight(parts["codes"], ones, torch.zeros_like(ones))
        if qparams:
            binary.input_quantizer.set_qparams(*qparams)
        if wq.value_bits == 16:
            out = BAPLayer(binary, 16)
            out.sparse_values.copy_(parts["S"].to(torch.float16))
            return out
        sparse = make_quant_layer(_no_bias(self.layer), INT8_SPEC, None)
        step = parts["step"].reshape(-1, 1)
        sparse.set_quantized_weight(parts["codes8"], step, torch.zeros_like(step))
        return BAPLayer(binary, 8, sparse)


def _no_bias(layer: nn.Module) -> nn.Module:
    """A bias-free copy of ``layer``'s geometry (the sparse branch has no bias)."""
    twin = copy.deepcopy(layer)
    twin.bias = None
    return twin


def bap_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: BAPConfig) -> BAPWeight:
    """Engine hook: a binary + sparse quantizer for every layer at the recipe's bits."""
    return BAPWeight(layer.weight, config)


register("bap", BAPConfig, "binary augmented pruning: binary weights + a ~2% sparse branch")(
    QATMethod(bap_weight_quantizer)
)


@register_short_name(
    r"w1(?:a(?P<a>\d+))?-bap-sp(?P<p>\d+(?:\.\d+)?)(?P<int8>-int8)?",
    "w1[a<A>]-bap-sp<P>[-int8]",
    ("w1a8-bap-sp98", "w1-bap-sp99-int8"),
)
def _short_name(m: re.Match[str]) -> Recipe:
    sparsity = float(m["p"])
    if not 50.0 <= sparsity < 100.0:
        raise CompactnnError(
            f"recipe {m.string!r}: the float branch's sparsity {m['p']}% must lie in "
            "[50, 100), e.g. w1a8-bap-sp98."
        )
    act = short_act_spec(int(m["a"])) if m["a"] else None
    config = BAPConfig(
        act=act, density=round(1.0 - sparsity / 100.0, 6), value_bits=8 if m["int8"] else 16
    )
    return Recipe(m.string, (Step("bap", config),))


@register_artifact_hook("before_layers")
def restore_bap(model: nn.Module, extra: dict) -> None:
    """At ``load``: each recorded layer of the skeleton becomes an empty :class:`BAPLayer`
    whose ``.binary`` (and ``.sparse``) placeholders the quantized layers then replace."""
    for name, where, layer, entry in saved_layers(model, extra, EXTRA_KEY):
        ok = isinstance(entry, dict) and set(entry) == {"values"}
        values = entry.get("values") if ok else None
        if type(layer) not in LAYER_TYPES or values not in ("float16", "int8"):
            raise ArtifactError(
                f"{where} names no Linear/Conv layer of the skeleton, or its values are not "
                "'float16' or 'int8'; pass the model it was made from, or re-save it."
            )
        sparse = _no_bias(layer) if values == "int8" else None
        bits = 16 if values == "float16" else 8
        bap = BAPLayer(copy.deepcopy(layer), bits, sparse)
        move_hooks(bap.binary, nn.Module())  # the copy's hooks go: bap takes the layer's own
        move_hooks(layer, bap)
        set_module(model, name, bap)
