"""Simulated (fake-quantized) layers that stay drop-in replacements for their float class.

``QuantLinear`` *is an* ``nn.Linear`` (likewise the convs), so code that reads
``layer.weight`` or checks ``isinstance(layer, nn.Linear)`` keeps working. The ground truth is
held in integer buffers (``weight_codes``, ``weight_scale``, ``weight_zero``); ``weight`` is
their dequantization, recomputed whenever the codes change. Saving packs the codes, loading
unpacks them and recomputes ``weight`` the same way, so outputs are bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn

from compactnn.core.basis import basis_levels, basis_of_levels
from compactnn.core.observer import RangeObserver
from compactnn.core.quantize import (
    dequantize,
    fake_quantize,
    group_fake_quantize,
    grouped_view,
    quantize,
    scale_zero_from_range,
    tensor_dynamic_fake_quantize,
)
from compactnn.core.ranges import estimate_range
from compactnn.core.spec import QuantSpec

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def format_name(spec: QuantSpec) -> str:
    """A short per-layer format label, e.g. ``uint4-asym-group32``."""
    gran = spec.granularity + (str(spec.group_size) if spec.group_size else "")
    return f"{spec.qtype.name}-{'sym' if spec.symmetric else 'asym'}-{gran}"


def rtn_weight_qparams(
    weight: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes, scale and zero point of a weight under ``spec``.

    Returns ``codes`` (weight's shape) and ``scale``/``zero`` of shape ``(rows, ngroups)``.
    """
    wg = grouped_view(weight.detach().float(), spec.granularity, spec.group_size)
    lo, hi = estimate_range(wg, spec.range_method, spec.qtype, spec.symmetric, spec.percentile)
    scale, zero = scale_zero_from_range(lo, hi, spec.qtype, spec.symmetric)
    codes = quantize(wg, scale, zero, spec.qtype).reshape(weight.shape)
    return codes, scale, zero


class ActQuantizer(nn.Module):
    """Per-tensor fake quantization of the activation entering a layer.

    States: ``observing`` (collect statistics, pass through), then calibrated (quantize).
    ``enabled = False`` passes values through unchanged (QDrop, debugging).

    The grid is uniform (``scale``, ``zero``) unless :meth:`set_levels` gave it ``2**bits``
    sorted levels (``levels``, a buffer; ``is_uniform`` False): then each value becomes the
    nearest level and ``scale``/``zero`` are unused.

    A spec with ``granularity="group"`` (symmetric) is dynamic instead: each token's groups
    of ``group_size`` inputs get their own scale at run time (:func:`group_fake_quantize`,
    the grid of ONNX Runtime's ``MatMulNBits`` at ``accuracy_level=4``); nothing is
    calibrated and ``scale``/``zero`` are unused (:attr:`is_group`). A spec with
    ``dynamic=True`` takes one range per tensor at run time instead
    (:func:`tensor_dynamic_fake_quantize`, ONNX's ``DynamicQuantizeLinear``; :attr:`is_dynamic`).
    :attr:`runtime_range` is True for both: no static grid exists.
    """

    def __init__(self, spec: QuantSpec, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.qtype = spec.qtype
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero", torch.zeros(()))
        self.calibrated = self.runtime_range  # a dynamic grid needs no calibration
        self.enabled = True
        self.observer: RangeObserver | None = None
        self.seed = seed
        self.register_buffer("levels", None)

    @property
    def is_group(self) -> bool:
        """True for a dynamic per-token, per-group grid (``spec.granularity == "group"``)."""
        return self.spec.granularity == "group"

    @property
    def is_dynamic(self) -> bool:
        """True for one range per tensor taken at run time (``spec.dynamic``)."""
        return bool(getattr(self.spec, "dynamic", False))

    @property
    def runtime_range(self) -> bool:
        """True when the grid is computed from each input (:attr:`is_group` or
        :attr:`is_dynamic`): ``scale`` and ``zero`` are unused and nothing is calibrated."""
        return self.is_group or self.is_dynamic

    @property
    def is_uniform(self) -> bool:
        """True for a ``scale * (q - zero)`` grid; False once :meth:`set_levels` was called."""
        return self.levels is None

    def set_levels(self, levels: torch.Tensor) -> None:
        """Make the grid non-uniform: ``levels``, ``2**bits`` sorted float16-representable values.

        Forward maps ``x`` to the nearest level; the thresholds are the midpoints
        ``t_k = (l_k + l_{k+1}) / 2`` (float32), and a value on a threshold goes up:
        ``x -> l_k`` with ``k = #{t : t <= x}``. The gradient is straight-through.

        Example:
            >>> aq = ActQuantizer(QuantSpec(bits=2, symmetric=False))
            >>> aq.set_levels(torch.tensor([0.0, 0.25, 1.0, 1.25]))
            >>> aq(torch.tensor([0.1, 0.125, 0.7, 9.0])).tolist()
            [0.0, 0.25, 1.0, 1.25]
        """
        lv = levels.detach().float().reshape(-1).cpu()
        if lv.numel() != self.qtype.levels:
            n, grid = self.qtype.levels, self.qtype.name
            raise ValueError(f"set_levels: {lv.numel()} levels, the {grid} grid has {n}")
        if not torch.isfinite(lv).all() or not torch.equal(lv, lv.half().float()):
            raise ValueError("set_levels: levels must be finite float16-representable values")
        if (lv[1:] < lv[:-1]).any():
            raise ValueError("set_levels: levels must be sorted in increasing order")
        self.levels = lv.clone()
        self.calibrated = True

    def start_observing(self) -> None:
        if self.runtime_range:  # ranges are taken at run time
            return
        keep = self.spec.range_method != "minmax"
        self.observer = RangeObserver(self.spec.range_method, keep, self.seed)

    def finish_observing(self) -> None:
        if self.runtime_range:
            return
        if self.observer is None or self.observer.min is None:
            raise RuntimeError("ActQuantizer.finish_observing: no calibration data reached it")
        lo, hi = self.observer.range(self.qtype, self.spec.symmetric, self.spec.percentile)
        scale, zero = scale_zero_from_range(lo, hi, self.qtype, self.spec.symmetric)
        self.set_qparams(scale.reshape(()), zero.reshape(()))
        self.observer = None

    def set_qparams(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(()))
        self.zero.copy_(zero.reshape(()))
        self.calibrated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.enabled or not self.calibrated:
            return x
        if self.levels is not None:
            return nearest_level(x, self.levels)
        if self.is_group:
            return group_fake_quantize(x, self.spec.bits, self.spec.group_size)
        if self.is_dynamic:
            return tensor_dynamic_fake_quantize(x, self.spec.bits)
        return fake_quantize(x, self.scale, self.zero, self.qtype)

    def extra_repr(self) -> str:
        grid = "levels" if self.levels is not None else "sym" if self.spec.symmetric else "asym"
        if self.is_group:
            grid = f"sym, per-token group{self.spec.group_size} dynamic"
        elif self.is_dynamic:
            grid = "asym, per-tensor dynamic"
        return f"{self.qtype.name}, {grid}"


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each value of ``x`` replaced by the nearest of the sorted ``levels`` (ties go up),
    with a straight-through gradient. Thresholds: midpoints ``(l_k + l_{k+1}) / 2``, float32.
    """
    lv = levels.float().to(x.device)
    thresholds = (lv[1:] + lv[:-1]) / 2
    idx = torch.bucketize(x.detach().float(), thresholds, right=True)  # #{t <= x}
    xq = lv[idx].to(x.dtype)
    return x + (xq - x).detach()


class IntegerWeightMixin:
    """Integer weight storage: ``weight_codes`` (the weight's shape), ``weight_scale`` and
    ``weight_zero`` (``(rows, ngroups)``); ``weight`` is their dequantization.

    Shared by the quantized Linear and Conv layers (:class:`QuantWeightMixin`) and the
    quantized embedding table (:mod:`compactnn.core.qembedding`), which has no input.
    """

    weight_spec: QuantSpec

    def _init_codes(self, weight_spec: QuantSpec) -> None:
        self.weight_spec = weight_spec
        qt = weight_spec.qtype
        self.register_buffer("weight_codes", torch.zeros(self.weight.shape, dtype=qt.storage_dtype))
        rows_groups = grouped_view(self.weight, weight_spec.granularity, weight_spec.group_size)
        self.register_buffer("weight_scale", torch.ones(rows_groups.shape[:2]))
        self.register_buffer("weight_zero", torch.zeros(rows_groups.shape[:2]))
        self.weight.requires_grad_(False)  # the codes' dequantization: trained through them

    def reset_parameters(self) -> None:
        """Zeros, not torch.nn's random init: every twin gets its values copied or loaded
        (:func:`make_quant_layer`, an artifact), so building one draws no random number and
        leaves the global torch generator where it was."""
        with torch.no_grad():
            for p in (getattr(self, "weight", None), getattr(self, "bias", None)):
                if isinstance(p, torch.Tensor) and not p.is_meta:
                    p.zero_()

    @property
    def format(self) -> str:
        base = format_name(self.weight_spec)
        if getattr(self, "weight_basis", None) is not None:
            return base + "-basis"
        return base + "-codebook" if getattr(self, "weight_levels", None) is not None else base

    def set_codebook(self, levels: torch.Tensor | None, basis: torch.Tensor | None = None) -> None:
        """Non-uniform grid (ternary with two scales, powers of two, binary ``{-a, +a}``,
        binary bases).

        ``levels`` has shape ``(rows, ngroups, 2**bits)``: code ``q`` of group ``(r, g)``
        dequantizes to ``levels[r, g, q - qmin]``; scale and zero point are then unused.
        Values must be float16-representable (they are stored as float16).

        With ``basis`` ``(rows, ngroups, bits)`` (float16-representable) the levels are
        exactly :func:`~compactnn.core.basis.basis_levels` of it: code ``q - qmin`` with bit
        ``j`` (most significant first) set adds ``+basis_j``, clear ``-basis_j``. The artifact
        then stores the ``bits`` coefficients instead of the ``2**bits`` levels. ``levels``
        may be None; if given it must equal those levels. Levels given alone that are not
        float16-representable but are exactly the levels of a float16 basis
        (:func:`~compactnn.core.basis.basis_of_levels`) are stored as that basis, so they
        still reload bit-exactly.

        Example:
            >>> q.set_codebook(None, basis=torch.tensor([0.875, 0.375]).expand(rows, 1, 2))
            ... # doctest: +SKIP
        """
        qt = self.weight_spec.qtype
        rg = tuple(self.weight_scale.shape)
        if basis is None:
            if levels is None:
                raise ValueError("set_codebook: pass levels or basis")
            lv = levels.detach().float().reshape(*rg, qt.levels).clone()
            if not torch.equal(lv, lv.half().float()):  # not storable as float16 levels ...
                basis = basis_of_levels(lv)  # ... but exactly a binary basis: store that
            if basis is None:
                self.register_buffer("weight_basis", None)
                self.register_buffer("weight_levels", lv)
                return
        b = basis.detach().float().reshape(*rg, qt.bits).contiguous().clone()
        if not torch.isfinite(b).all() or not torch.equal(b, b.half().float()):
            raise ValueError("set_codebook: basis must be finite float16-representable values")
        lv = basis_levels(b)
        if levels is not None and not torch.equal(levels.detach().float().reshape(lv.shape), lv):
            raise ValueError("set_codebook: levels differ from the levels of the basis")
        self.register_buffer("weight_basis", b)
        self.register_buffer("weight_levels", lv)

    def set_quantized_weight(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
    ) -> None:
        """Install integer codes and their grid; ``weight`` becomes their dequantization."""
        qt = self.weight_spec.qtype
        if codes.min() < qt.qmin or codes.max() > qt.qmax:
            raise ValueError(f"codes outside the {qt.name} grid")
        self.weight_codes.copy_(codes.reshape(self.weight.shape).to(qt.storage_dtype))
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
        self.weight_zero.copy_(zero.reshape(self.weight_zero.shape))
        self.refresh_weight()

    def refresh_weight(self) -> None:
        if self.weight.is_meta:  # loaded straight into kernel layers: no float copy is made
            return
        spec = self.weight_spec
        cg = grouped_view(self.weight_codes, spec.granularity, spec.group_size)
        levels = getattr(self, "weight_levels", None)
        if levels is not None:  # codebook: gather (rows, ngroups, group) from the levels
            idx = cg.long() - spec.qtype.qmin
            w = torch.gather(levels.expand(*idx.shape[:2], -1), 2, idx).reshape(self.weight.shape)
        else:
            w = dequantize(cg, self.weight_scale, self.weight_zero).reshape(self.weight.shape)
        with torch.no_grad():
            self.weight.copy_(w)


class QuantWeightMixin(IntegerWeightMixin):
    """Integer weights plus an optional input quantizer: the quantized Linear and Conv
    layers (what :func:`is_quant_layer` recognises)."""

    input_quantizer: ActQuantizer | None

    def _init_quant(self, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> None:
        self._init_codes(weight_spec)
        self.input_quantizer = ActQuantizer(act_spec) if act_spec is not None else None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


def _copy_float(dst: nn.Module, src: nn.Module) -> None:
    """Copy ``src``'s weight and bias into ``dst``; the bias keeps ``src``'s ``requires_grad``
    (the weight is frozen: it is the codes' dequantization)."""
    with torch.no_grad():
        dst.weight.copy_(src.weight.detach().float())
        if src.bias is not None:
            dst.bias.copy_(src.bias.detach().float())
            dst.bias.requires_grad_(src.bias.requires_grad)


class QuantLinear(QuantWeightMixin, nn.Linear):
    """``nn.Linear`` with integer weights and an optional input activation quantizer."""

    def __init__(self, in_features, out_features, bias, weight_spec, act_spec=None):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_quant(weight_spec, act_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.weight, self.bias)


class _QuantConvMixin(QuantWeightMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.weight, self.bias)


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with integer weights and an optional input activation quantizer."""

    def __init__(self, conv_kwargs: dict, weight_spec, act_spec=None):
        nn.Conv1d.__init__(self, **conv_kwargs)
        self._init_quant(weight_spec, act_spec)


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with integer weights and an optional input activation quantizer."""

    def __init__(self, conv_kwargs: dict, weight_spec, act_spec=None):
        nn.Conv2d.__init__(self, **conv_kwargs)
        self._init_quant(weight_spec, act_spec)


def conv_kwargs(conv: nn.Conv1d | nn.Conv2d) -> dict:
    """Constructor arguments that rebuild ``conv`` with the same geometry."""
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def make_quant_layer(
    layer: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec | None
) -> QuantLinear | QuantConv1d | QuantConv2d:
    """An empty quantized twin of ``layer`` (float weight and bias copied, codes unset)."""
    if isinstance(layer, nn.Linear):
        q = QuantLinear(
            layer.in_features, layer.out_features, layer.bias is not None, weight_spec, act_spec
        )
    elif isinstance(layer, nn.Conv2d):
        q = QuantConv2d(conv_kwargs(layer), weight_spec, act_spec)
    elif isinstance(layer, nn.Conv1d):
        q = QuantConv1d(conv_kwargs(layer), weight_spec, act_spec)
    else:
        raise TypeError(f"cannot quantize {type(layer).__name__}")
    _copy_float(q, layer)
    return q


def quantize_layer_rtn(
    layer: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec | None
) -> QuantLinear | QuantConv1d | QuantConv2d:
    """Round-to-nearest quantized twin of ``layer`` (activations still to calibrate)."""
    q = make_quant_layer(layer, weight_spec, act_spec)
    q.set_quantized_weight(*rtn_weight_qparams(layer.weight, weight_spec))
    return q


def is_quant_layer(m: nn.Module) -> bool:
    """A quantized Linear / Conv layer (never a quantized embedding table)."""
    return isinstance(m, QuantWeightMixin)


def has_integer_weight(m: nn.Module) -> bool:
    """A module whose weight is held as integer codes: a quantized layer or embedding."""
    return isinstance(m, IntegerWeightMixin)
