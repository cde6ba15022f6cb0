"""Swap a compressed model's ``QuantLinear`` layers for real low-precision CPU kernels, and
its quantized embedding tables for a gather-then-dequantize lookup (no dense float table)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compactnn.core.dynact import DynamicActQuantizer
from compactnn.core.modules import set_module
from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import QuantLinear, is_quant_layer
from compactnn.errors import CompactnnError, first_line, name_list, user_stacklevel
from compactnn.kernels.embedding import EmbeddingKernel
from compactnn.kernels.linear import (
    DENSE_MIN_ROWS,
    DTYPES,
    DenseLinear,
    Int4WeightLinear,
    Int8WeightLinear,
    int4_unsupported,
    int8_unsupported,
)
from compactnn.kernels.w8a8 import W8A8Linear

KERNEL_TYPES = (Int8WeightLinear, Int4WeightLinear, DenseLinear, W8A8Linear, EmbeddingKernel)


@dataclass(frozen=True)
class KernelConfig:
    """How :func:`to_kernels` runs a model.

    Attributes:
        dtype: the dtype the model runs in. ``torch.bfloat16`` (default): weight-only
            kernels, attention, norms and the rest of the float model run in bfloat16 (the
            float model's inputs and outputs stay float32). ``torch.float32``: the kernel
            layers match the simulated model up to summation order, but the weight-only
            low-bit kernels take a slow path on this CPU.
        dense_min_rows: weight-only layers use a run-time dense copy of their dequantized
            weight from this many input rows (tokens) on and the low-bit kernel below it;
            None: always the low-bit kernel.
        fused: compile the W8A8 layers' activation quantization and epilogue with
            ``torch.compile`` (once per process, a few tens of seconds; used from
            ``FUSED_MIN_ROWS`` rows); False keeps them eager.
        hold_dense: weight-only layers keep their dense copy between calls (fast at large
            batches, 2 bytes per weight resident); False rebuilds it per call and frees it,
            so the running model holds only the packed codes.
    """

    dtype: torch.dtype = torch.bfloat16
    dense_min_rows: int | None = DENSE_MIN_ROWS
    fused: bool = True
    hold_dense: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CompactnnError(
                f"to_kernels dtype={self.dtype} is not supported: use torch.bfloat16 or "
                "torch.float32"
            )
        if self.dense_min_rows is not None and (
            not isinstance(self.dense_min_rows, int) or self.dense_min_rows < 1
        ):
            raise CompactnnError(
                f"to_kernels dense_min_rows={self.dense_min_rows!r} must be an integer >= 1 "
                "(or None to always use the low-bit kernels)"
            )


class Float32Island(nn.Module):
    """Runs a layer without a kernel (e.g. a static activation grid) in float32 inside a
    lower-precision model: the input is cast up and the output back to the input's dtype."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def weight(self) -> torch.Tensor:
        """The inner layer's float32 weight (held already), for model code that reads a
        linear layer's ``weight.dtype`` / ``weight.device`` (T5 casts ``wo``'s input to it)."""
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


def kernel_layer(layer: QuantLinear, config: KernelConfig | None = None) -> nn.Module | None:
    """The fastest kernel layer for ``layer``, or None when no kernel takes its format."""
    return kernel_or_reason(layer, config)[0]


def kernel_or_reason(
    layer: QuantLinear, config: KernelConfig | None = None
) -> tuple[nn.Module | None, str | None]:
    """:func:`kernel_layer` and, when it gives None, why (None when a kernel takes it).

    A layer a low-bit kernel cannot take (e.g. int4 with ``out_features`` not a multiple of
    16) falls back to the next kernel that fits: the dense copy in bfloat16, else simulated.
    """
    config = config or KernelConfig()
    aq = layer.input_quantizer
    args = (layer, config.dtype, config.dense_min_rows, config.hold_dense)
    if isinstance(aq, DynamicActQuantizer):
        try:
            return W8A8Linear(layer, fused=config.fused), None
        except ValueError:
            return None, None  # e.g. asymmetric or group-wise weights: no W8A8 kernel
    if aq is not None:
        return None, None  # static activation grids: no kernel here
    kind, why = _lowbit_kind(layer, config.dtype)
    if kind is not None:
        try:
            return kind(*args), None
        except ValueError as exc:
            why = str(exc)
    # weight-only formats without a low-bit kernel: a dense copy, only worth it below fp32
    if config.dtype == torch.float32:
        return None, why
    hold = config.hold_dense or getattr(layer, "weight_levels", None) is not None
    return DenseLinear(layer, config.dtype, hold_dense=hold), None


def _lowbit_kind(layer: QuantLinear, dtype: torch.dtype) -> tuple[type | None, str | None]:
    """The low-bit kernel class for a weight-only ``layer``, or None and why none takes it
    (None too for formats no low-bit kernel is made for: codebooks, 5-7 bits)."""
    bits = layer.weight_spec.bits
    if getattr(layer, "weight_levels", None) is not None or 4 < bits < 8:
        return None, None
    if bits == 8:
        why = int8_unsupported(layer, dtype)
        return (Int8WeightLinear if why is None else None), why
    why = int4_unsupported(layer)
    return (Int4WeightLinear if why is None else None), why


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with its floating-point tensors (also inside tuples, lists, dicts) cast."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if type(obj) is dict:  # a caller's dict is never changed
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, dict):  # in place: keeps ModelOutput classes and attributes
        for k, v in list(obj.items()):
            obj[k] = _cast_floats(v, dtype)
        return obj
    if isinstance(obj, list):
        return [_cast_floats(v, dtype) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_cast_floats(v, dtype) for v in obj)
    return obj


def _cast_params(m: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``m``'s float parameters and buffers, skipping kernel layers and float32
    islands (they keep their own dtypes)."""
    if isinstance(m, (*KERNEL_TYPES, Float32Island)):
        return
    for p in m.parameters(recurse=False):
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for name, b in list(m.named_buffers(recurse=False)):
        if b is not None and b.is_floating_point():
            setattr(m, name, b.to(dtype))
    for child in m.children():
        _cast_params(child, dtype)


def _to_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Run ``model`` in ``dtype``: cast its float parameters and buffers outside the kernel
    layers, and make it take and return float32 tensors as before."""
    _cast_params(model, dtype)
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: (_cast_floats(args, dtype), _cast_floats(kwargs, dtype)),
        with_kwargs=True,
    )
    model.register_forward_hook(lambda _m, _args, out: _cast_floats(out, torch.float32))


def to_kernels(
    model: nn.Module,
    *,
    inplace: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    dense_min_rows: int | None = DENSE_MIN_ROWS,
    fused: bool = True,
    hold_dense: bool = True,
) -> nn.Module:
    """A copy of ``model`` whose quantized linear layers run on low-precision CPU kernels.

    W8A8 with per-token dynamic activations runs on ``torch._int_mm`` (exact int32
    accumulation); int8 per-channel and 2/3/4-bit group-wise weight-only layers run on the
    int8/int4 packed kernels below ``dense_min_rows`` rows and on a run-time dense copy of
    the dequantized weight from there on; other weight-only formats (8-bit group-wise,
    codebooks) run on the dense copy when ``dtype`` is bfloat16. Quantized embedding tables
    run as a gather of the requested rows' codes then dequantization
    (:class:`~compactnn.kernels.embedding.EmbeddingKernel`). A layer whose shape a low-bit
    kernel cannot take (int4: ``out_features`` a multiple of 16, see
    :func:`~compactnn.kernels.linear.int4_unsupported`) runs on the dense copy in bfloat16
    and simulated in float32. Layers left simulated are listed in
    ``model._compactnn_kernels["simulated"]``, with their reasons in ``["simulated_why"]``.
    See :class:`KernelConfig`.

    Signature: ``to_kernels(model, *, inplace=False, dtype=torch.bfloat16,
    dense_min_rows=8, fused=True, hold_dense=True)``; every option is keyword-only.

    Args:
        model: a model from ``compactnn.compress`` or ``compactnn.load``.
        inplace: change ``model`` itself instead of a copy.
        dtype: ``torch.bfloat16`` (fast; the whole model runs in bfloat16) or
            ``torch.float32`` (kernel outputs match the simulated model up to summation
            order).
        dense_min_rows: rows (tokens in a batch) from which weight-only layers use the dense
            copy; None keeps the low-bit kernels at every size.
        fused: compile the W8A8 quantization and epilogue (see :class:`KernelConfig`).
        hold_dense: False keeps no dense weight copy between calls (smallest resident
            memory; pair it with ``dense_min_rows=LEAN_DENSE_MIN_ROWS`` from
            :mod:`compactnn.kernels.linear`); see :class:`KernelConfig`.

    Returns:
        The model with kernel layers (``model`` itself when ``inplace``); it takes and
        returns float32 tensors whatever ``dtype`` is.

    Example:
        >>> qmodel = compactnn.compress(model, "w4-g32-gptq", calib_data=batches)  # doctest: +SKIP
        >>> fast = compactnn.to_kernels(qmodel)                                    # doctest: +SKIP
        >>> exact = compactnn.to_kernels(qmodel, dtype=torch.float32, fused=False)  # doctest: +SKIP
    """
    _refuse_deployed(model)
    config = KernelConfig(
        dtype=dtype, dense_min_rows=dense_min_rows, fused=fused, hold_dense=hold_dense
    )
    static = {  # layers with a calibrated activation grid: no kernel takes them
        n
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
        and m.input_quantizer is not None
        and not isinstance(m.input_quantizer, DynamicActQuantizer)
        and not getattr(m.input_quantizer, "runtime_range", False)
    }
    grouped = {  # MatMulNBits' or DynamicQuantizeMatMul's grid: ONNX Runtime runs them
        n
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and getattr(m.input_quantizer, "runtime_range", False)
    }
    out = swap_kernels(model if inplace else copy.deepcopy(model), config)
    info = out._compactnn_kernels
    if info["simulated"]:
        hint = (
            " Layers with calibrated (static) activation grids have no kernel: a recipe with "
            "per-token dynamic activations (e.g. 'w8a8-smoothquant') or weight-only "
            "('w8', 'w4-g32') runs on them."
            if static & set(info["simulated"])
            else ""
        ) + (
            " Layers with per-group (a8g) or per-tensor (a8d) dynamic activations run on ONNX "
            "Runtime's MatMulNBits / DynamicQuantizeMatMul: compactnn.to_ort_nbits(model, "
            "example)."
            if grouped & set(info["simulated"])
            else ""
        )
        none = "" if info["swapped"] else "no layer runs on low-bit kernels: "
        warnings.warn(
            f"to_kernels: {none}{len(info['simulated'])} quantized layer(s) have no kernel "
            f"here and run simulated ({name_list(info['simulated'], 3)}).{hint}",
            stacklevel=user_stacklevel(),
        )
    elif not info["swapped"]:
        warnings.warn(
            "to_kernels: no layer of this model runs on low-bit kernels: it has no quantized "
            f"layer; the result is the same model in {info['dtype']}. Compress it first, e.g. "
            "compactnn.compress(model, 'w4-g32-gptq', calib_data=...).",
            stacklevel=user_stacklevel(),
        )
    return out


def _refuse_deployed(model: nn.Module) -> None:
    """A model from ``compactnn.deploy`` already runs on integer kernels (and its prepacked
    weights cannot be copied): refuse it before any work, saying what to_kernels takes."""
    if getattr(model, "is_deployed", False) is True:  # a deployment.api.DeployedModel
        raise CompactnnError(
            f"to_kernels: this model is already deployed (compactnn.deploy runs it on "
            f"{model.backend} integer kernels): call it as it is. to_kernels takes a "
            "compressed model that is not deployed, e.g. a transformer from "
            "compactnn.compress(model, 'w4-g32-gptq', ...) or compactnn.load(path)."
        )


def materialize(layer: nn.Module) -> None:
    """Give a quantized layer loaded without float weights (a ``meta`` weight, see
    :mod:`compactnn.kernels.load`) its dequantized float32 weight, for layers that run
    simulated; a no-op for any other module."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_meta and hasattr(layer, "refresh_weight"):
        layer.weight = nn.Parameter(torch.empty(weight.shape), requires_grad=False)
        layer.refresh_weight()


def simulated_reason(m: nn.Module, dtype: torch.dtype, why: str | None = None) -> str:
    """Why :func:`swap_kernels` leaves the quantized module ``m`` simulated (``why``: the
    reason the low-bit kernel refused it, from :func:`kernel_or_reason`)."""
    where = str(dtype).removeprefix("torch.")
    if why is not None:
        return f"no kernel takes it ({why}): runs simulated in {where}"
    if not isinstance(m, (QuantLinear, QuantEmbedding)):
        return f"no kernel for {type(m).__name__}: runs simulated in {where}"
    if isinstance(m, QuantEmbedding):
        return f"no kernel for codebook tables: runs simulated in {where}"
    aq = m.input_quantizer
    if getattr(aq, "is_group", False):
        return (
            "per-group dynamic activations: no kernel here, runs simulated in float32 "
            "(compactnn.to_ort_nbits runs it on MatMulNBits)"
        )
    if getattr(aq, "is_dynamic", False):
        return (
            "per-tensor dynamic activations: no kernel here, runs simulated in float32 "
            "(compactnn.to_ort_nbits runs it on DynamicQuantizeMatMul)"
        )
    if aq is not None and not isinstance(aq, DynamicActQuantizer):
        return "static activation grid: no kernel, runs simulated in float32"
    if isinstance(aq, DynamicActQuantizer):
        return "dynamic activations on a grid W8A8Linear does not take: runs simulated"
    return "no float32 kernel for this weight format: runs simulated in float32"


def _kernel_of(
    name: str, m: QuantLinear, config: KernelConfig
) -> tuple[nn.Module | None, str | None]:
    """:func:`kernel_or_reason` for layer ``name``; a torch kernel failing on a layer the
    checks let through is reported with the layer's name and shape, as a kernel problem."""
    try:
        return kernel_or_reason(m, config)
    except RuntimeError as exc:
        spec = m.weight_spec
        raise CompactnnError(
            f"to_kernels: no kernel could be built for layer {name!r} ({m.in_features}->"
            f"{m.out_features}, {spec.bits}-bit {spec.granularity} weights): {first_line(exc)}. "
            "The model itself is fine: run it simulated (without to_kernels or load's kernels=)."
        ) from exc


def swap_kernels(out: nn.Module, config: KernelConfig) -> nn.Module:
    """:func:`to_kernels` on ``out`` itself (changed in place and returned); every quantized
    layer or table it does not swap is listed in ``_compactnn_kernels["simulated"]`` and its
    reason in ``["simulated_why"]``."""
    dtype = config.dtype
    swapped, simulated, why = {}, [], {}
    made: dict[int, nn.Module] = {}  # a module held under several names (T5's tied tables)
    for name, m in list(out.named_modules(remove_duplicate=False)):
        if id(m) in made:  # becomes the same kernel under every name
            set_module(out, name, made[id(m)])
            continue
        if isinstance(m, QuantLinear):
            k, refused = _kernel_of(name, m, config)
            if k is None:
                materialize(m)
                simulated.append(name)
                why[name] = simulated_reason(m, dtype, refused)
                made[id(m)] = Float32Island(m) if dtype != torch.float32 else m
                set_module(out, name, made[id(m)])
            else:
                set_module(out, name, k)
                made[id(m)] = k
                swapped[name] = type(k).__name__
        elif isinstance(m, QuantEmbedding) and getattr(m, "weight_levels", None) is None:
            made[id(m)] = EmbeddingKernel(m, dtype)  # codes only, no float table
            set_module(out, name, made[id(m)])
            swapped[name] = "EmbeddingKernel"
        elif is_quant_layer(m) or isinstance(m, QuantEmbedding):  # e.g. QuantConv2d
            made[id(m)] = m
            simulated.append(name)
            why[name] = simulated_reason(m, dtype)
    if dtype != torch.float32:
        _to_dtype(out, dtype)
    out._compactnn_kernels = {
        "swapped": swapped,
        "simulated": simulated,
        "simulated_why": why,
        "dtype": str(dtype).removeprefix("torch."),
        "dense_min_rows": config.dense_min_rows,
        "fused": config.fused,
        "hold_dense": config.hold_dense,
    }
    return out
