"""Weight-only low-precision CPU linear layers built from a ``QuantLinear``'s integer codes.

* :class:`Int8WeightLinear`: int8 per-channel weights (``torch._weight_int8pack_mm``).
* :class:`Int4WeightLinear`: 2-, 3- or 4-bit group-wise weights on the int4 packed kernel
  (``aten._convert_weight_to_int4pack_for_cpu`` + ``torch._weight_int4pack_mm_for_cpu``);
  codes below 4 bits are valid int4 codes, so W3/W2 run on the same kernel.
* :class:`DenseLinear`: any weight-only format, as a dense copy of the dequantized weight
  (for formats no low-bit kernel takes, e.g. the 8-bit group-wise first/last layers).

Each layer computes in ``dtype`` (its input is cast to it and the output cast back). With
``float32`` the low-bit kernels match the simulated (dequantized) layer up to summation
order, but PyTorch runs them on a slow path on CPUs without AMX; with ``bfloat16`` they are
fast for a few rows and the activations, scales and outputs are rounded to bfloat16 (8
significant bits). From ``dense_min_rows`` rows up, a cached dense copy of the dequantized
weight in ``dtype`` (oneDNN-prepacked for bfloat16) is used instead, because the low-bit
kernels lose to a dense bfloat16 GEMM there (measured in ``docs/transformers.md``). The dense
copy lives only at run time (not in ``state_dict``): it costs 2 bytes per weight in bfloat16
(4 in float32) on top of the packed codes.

With ``hold_dense=False`` no dense copy is held: from ``dense_min_rows`` rows on, the layer
dequantizes its codes into a temporary weight for each call (freed when the call returns),
the same values as the held copy. The resident model then stays small (int4: one extra
byte per weight for the unpacked-nibble codes the dequantization reads, beside the kernel's
packed half byte), and the dequantization is cheap next to a GEMM of many rows (MiniLM batch
64: a few ms per forward against hundreds).

Each layer's ``weight`` is an empty stand-in (no values) in the compute dtype on the layer's
device, for model code that reads a linear layer's ``weight.dtype`` or ``weight.device``
(Hugging Face T5 casts the input of ``wo`` to ``wo.weight.dtype``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactnn.core.qlayers import QuantLinear
from compactnn.core.quantize import dequantize, grouped_view

INT4_GROUPS = (32, 64, 128, 256)
INT4_N_BLOCK = 16  # _convert_weight_to_int4pack_for_cpu needs out_features % 16 == 0
DENSE_MIN_ROWS = 8  # rows from which the dense copy beats the low-bit kernels (bf16, Zen 4)
# without a held copy (hold_dense=False) the per-call dequantization and unprepacked GEMM
# beat the int4/int8 kernels only from ~100-250 rows (bf16, Zen 4, loaded machine)
LEAN_DENSE_MIN_ROWS = 128
DTYPES = (torch.float32, torch.bfloat16)
CHUNK_ELEMENTS = 1 << 20  # float32 elements dequantized at a time from codes (4 MB)


def dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight of a quantized layer in ``dtype``.

    ``layer.weight`` cast when it holds values. A layer loaded straight into kernels
    (:mod:`compactnn.kernels.load`) has a ``meta`` weight: its values are then computed from
    the integer codes a slice at a time, with the simulation's float32 formula (``(q - z) *
    s``, or the codebook's ``levels[q - qmin]``) and rounded to ``dtype`` per slice, so the
    result is bit-identical to ``layer.weight.to(dtype)`` and no float32 copy of the whole
    weight exists.
    """
    if not layer.weight.is_meta:
        return layer.weight.detach().to(dtype)
    spec = layer.weight_spec
    codes = grouped_view(layer.weight_codes, spec.granularity, spec.group_size)  # (R, NG, G)
    levels = getattr(layer, "weight_levels", None)
    out = torch.empty(codes.shape, dtype=dtype)
    per_tensor = codes.shape[0] == 1  # one row: slice along the elements instead
    step = max(1, CHUNK_ELEMENTS // (codes.shape[1] * codes.shape[2])) if not per_tensor else 1
    step_k = CHUNK_ELEMENTS if per_tensor else codes.shape[2]
    for r in range(0, codes.shape[0], step):
        for k in range(0, codes.shape[2], step_k):
            q = codes[r : r + step, :, k : k + step_k]
            if levels is not None:
                idx = q.long() - spec.qtype.qmin
                lv = levels[r : r + step]
                w = torch.gather(lv.expand(*idx.shape[:2], -1), 2, idx)
            else:
                w = dequantize(q, layer.weight_scale[r : r + step], layer.weight_zero[r : r + step])
            out[r : r + step, :, k : k + step_k] = w.to(dtype)
    return out.reshape(layer.weight.shape)


class DenseWeight:
    """A run-time dense weight ``(out, in)``: oneDNN-prepacked in bfloat16, plain otherwise.

    Not a buffer (a prepacked oneDNN tensor has no storage to save or copy), so it stays out
    of ``state_dict``; copies and pickles carry it as a plain tensor and repack it.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.dtype = weight.dtype
        self.packed = self._pack(weight.detach().contiguous())

    def _pack(self, w: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.bfloat16:
            return torch.ops.mkldnn._reorder_linear_weight(w, None)
        return w

    def plain(self) -> torch.Tensor:
        """The weight as an ordinary tensor."""
        return self.packed.to_dense() if self.packed.is_mkldnn else self.packed

    def linear(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x2 @ W^T + bias`` for a contiguous ``(rows, in)`` input in ``self.dtype``."""
        if self.packed.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x2, self.packed, bias, "none", [], "")
        return nn.functional.linear(x2, self.packed, bias)

    def __deepcopy__(self, memo: dict) -> DenseWeight:
        return DenseWeight(self.plain().clone())

    def __getstate__(self) -> dict[str, Any]:
        return {"weight": self.plain()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["weight"])


def int8_unsupported(layer: QuantLinear, dtype: torch.dtype) -> str | None:
    """Why :class:`Int8WeightLinear` cannot take ``layer`` in ``dtype`` (None: it can)."""
    spec, n, k = layer.weight_spec, layer.out_features, layer.in_features
    if spec.bits != 8:
        return f"{spec.bits}-bit weights (the int8 kernel takes 8 bits)"
    if tuple(layer.weight_scale.shape) != (n, 1):
        return f"{spec.granularity} scales (the int8 kernel takes one scale per output channel)"
    if dtype == torch.bfloat16 and k % 16:
        # torch's bfloat16 int8-weight kernel reads inputs in blocks of 16 and crashes the
        # process (segmentation fault) on other widths (measured: torch 2.14, Zen 4)
        return f"in_features={k} is not a multiple of 16 (the bfloat16 int8 kernel needs it)"
    return None


def int4_unsupported(layer: QuantLinear) -> str | None:
    """Why :class:`Int4WeightLinear` cannot take ``layer`` (None: it can).

    The packed int4 CPU kernel takes <= 4-bit codes, one scale per output channel and group
    of ``in_features`` with a group in ``INT4_GROUPS`` dividing ``in_features``, and packs
    output channels in blocks of ``INT4_N_BLOCK``.
    """
    spec, n, k = layer.weight_spec, layer.out_features, layer.in_features
    if spec.bits > 4:
        return f"{spec.bits}-bit weights (the int4 kernel takes <= 4 bits)"
    if spec.granularity not in ("group", "channel"):
        return f"{spec.granularity} scales (the int4 kernel takes per-channel or group-wise)"
    group = spec.group_size if spec.granularity == "group" else k
    if group not in INT4_GROUPS:
        what = "group" if spec.granularity == "group" else "per-channel in_features"
        return f"{what} {group} (the int4 kernel takes groups of {INT4_GROUPS})"
    if k % group or tuple(layer.weight_scale.shape) != (n, k // group):
        return f"scales {tuple(layer.weight_scale.shape)} do not tile ({n}, {k}) by {group}"
    if n % INT4_N_BLOCK:
        return (
            f"out_features={n} is not a multiple of {INT4_N_BLOCK} (the int4 kernel packs "
            f"output channels by {INT4_N_BLOCK})"
        )
    return None


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"kernel dtype must be one of {DTYPES}, got {dtype}")


class _WeightOnly(nn.Module):
    """Shared plumbing: compute dtype, bias, the dense copy and the row-count switch."""

    def _setup(
        self,
        layer: QuantLinear,
        dtype: torch.dtype,
        dense_min_rows: int | None,
        hold_dense: bool = True,
    ) -> None:
        _check_dtype(dtype)
        if dense_min_rows is not None and dense_min_rows < 1:
            raise ValueError(f"dense_min_rows must be >= 1 or None, got {dense_min_rows}")
        self.dtype, self.dense_min_rows = dtype, dense_min_rows
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.dense = None  # the dequantized weight rounded to ``dtype``, when asked for
        self.hold_dense = hold_dense
        if dense_min_rows is not None and hold_dense:
            self.dense = DenseWeight(dense_weight(layer, dtype))
        elif dense_min_rows is not None:  # per-call dequantization: float32 grid (out, ngroups)
            rows = (self.out_features, -1)  # a per-tensor grid (1, 1): one row per channel
            scale, zero = layer.weight_scale.float(), layer.weight_zero.float()
            self.register_buffer("dq_scale", scale.expand(rows).clone(), persistent=False)
            self.register_buffer("dq_zero", zero.expand(rows).clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor ``(0,)`` in the compute dtype on the layer's device.

        A stand-in, not the weight: it answers ``dtype`` and ``device`` for model code that
        reads them (T5's feed-forward casts its input to ``wo.weight.dtype``, which this
        layer casts to anyway), holds no values (the weight lives as integer codes, see
        :meth:`dequantized` and :func:`dense_weight`) and fails loudly if computed with. Its
        shape is not ``(out, in)``, so the layer is not taken for a float weight layer.
        """
        return torch.empty(0, dtype=self.dtype, device=self._device())

    def _device(self) -> torch.device:
        """Where the layer's codes (or its dense copy) live."""
        for t in self.buffers():
            return t.device
        return self.dense.packed.device if self.dense is not None else torch.device("cpu")

    def _bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(self.dtype)

    def _lowbit(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dq_codes(self) -> torch.Tensor:
        """Integer codes ``(out, in)`` in the frame of ``dq_zero`` (any integer dtype)."""
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The dequantized weight ``(out, in)`` in ``dtype``, computed now from the codes:
        ``((q - z) * s)`` in float32 (the simulation's values), then rounded."""
        q = self._dq_codes()
        rows, ngroups = self.dq_scale.shape
        qg = q.reshape(rows, ngroups, -1).float()  # (out, ngroups, G)
        w = (qg - self.dq_zero.unsqueeze(-1)) * self.dq_scale.unsqueeze(-1)
        return w.reshape(rows, -1).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()  # (M, K)
        big = self.dense_min_rows is not None and x2.shape[0] >= self.dense_min_rows
        if big and self.dense is not None:
            y = self.dense.linear(x2, self._bias())
        elif big:  # temporary dense weight, freed after the call
            y = nn.functional.linear(x2, self.dequantized(), self._bias())
        else:
            y = self._lowbit(x2)
            if self.bias is not None:
                y = y + self._bias()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"dtype={self.dtype}, dense_min_rows={self.dense_min_rows}, "
            f"hold_dense={self.hold_dense}"
        )


def _signed_codes(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes as int8 and zero points ``(out, ngroups)`` in the same signed frame."""
    qt = layer.weight_spec.qtype
    shift = 0 if qt.signed else 128 if qt.bits == 8 else 0
    codes = (layer.weight_codes.to(torch.int16) - shift).to(torch.int8)
    return codes, layer.weight_zero - shift


class Int8WeightLinear(_WeightOnly):
    """``y = x @ ((q - z) * s)^T + b`` with int8 ``q`` and per-output-channel ``s``, ``z``.

    Args:
        layer: an 8-bit per-channel weight-only ``QuantLinear`` (ValueError with the reason
            otherwise: :func:`int8_unsupported`).
        dtype: compute dtype (``torch.float32``: exact but slow here; ``torch.bfloat16``).
        dense_min_rows: from this many rows on, use the dense weight (None: never).
        hold_dense: hold a dense copy (True) or dequantize a temporary one per call.
    """

    def __init__(
        self,
        layer: QuantLinear,
        dtype: torch.dtype = torch.float32,
        dense_min_rows: int | None = None,
        hold_dense: bool = True,
    ) -> None:
        super().__init__()
        why = int8_unsupported(layer, dtype)
        if why is not None:
            raise ValueError(f"Int8WeightLinear cannot take this layer: {why}")
        self._setup(layer, dtype, dense_min_rows, hold_dense)
        codes, zero = _signed_codes(layer)
        if not hold_dense and dense_min_rows is not None:
            self.dq_zero = zero.float()  # the codes' signed frame
        self.register_buffer("codes", codes.contiguous())  # (out, in) int8
        self.register_buffer("scale", layer.weight_scale[:, 0].to(dtype).contiguous())  # (out,)
        zs = (zero[:, 0] * layer.weight_scale[:, 0]).to(dtype)
        self.register_buffer("zero_scale", zs if bool(zs.any()) else None)  # (out,) or None

    def _lowbit(self, x2: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x2, self.codes, self.scale)
        if self.zero_scale is not None:
            y = y - x2.sum(-1, keepdim=True) * self.zero_scale
        return y

    def _dq_codes(self) -> torch.Tensor:
        return self.codes


class Int4WeightLinear(_WeightOnly):
    """Group-wise ``(q - z) * s`` weights (``q`` in 0..15) on the packed int4 CPU kernel.

    Args:
        layer: a 2- to 4-bit group-wise (or per-channel, ``in`` in ``INT4_GROUPS``)
            weight-only ``QuantLinear`` whose ``out_features`` is a multiple of
            ``INT4_N_BLOCK`` (ValueError with the reason otherwise: :func:`int4_unsupported`).
        dtype: compute dtype (``torch.float32``: exact but slow here; ``torch.bfloat16``).
        dense_min_rows: from this many rows on, use the dense weight (None: never).
        hold_dense: hold a dense copy (True) or dequantize a temporary one per call.
    """

    def __init__(
        self,
        layer: QuantLinear,
        dtype: torch.dtype = torch.float32,
        dense_min_rows: int | None = None,
        hold_dense: bool = True,
    ) -> None:
        super().__init__()
        spec = layer.weight_spec
        why = int4_unsupported(layer)
        if why is not None:
            raise ValueError(f"Int4WeightLinear cannot take this layer: {why}")
        group = spec.group_size if spec.granularity == "group" else layer.in_features
        self._setup(layer, dtype, dense_min_rows, hold_dense)
        qt = spec.qtype
        shift = 8 if qt.signed else 0  # signed grid: into 0..15
        codes = layer.weight_codes.to(torch.int32) + shift
        zero = layer.weight_zero.float() + shift  # (out, ngroups)
        if not hold_dense and dense_min_rows is not None:
            # the kernel's packed layout is opaque: keep the codes as uint8 for dequantizing
            self.register_buffer("dq_codes", codes.to(torch.uint8), persistent=False)
            self.dq_zero = zero.clone()
        scale = layer.weight_scale.float()
        # The kernel computes (q - 8) * scale + offset per group. Codes below 4 bits leave
        # room to move each group's codes by d so that q + d - 8 ~ q - z: the offset
        # (8 - z - d) * scale then stays small and rounding it to bfloat16 costs little
        # (with d = 0 a 2-bit group's offset is ~8 scales, much larger than its weights).
        lo, hi = qt.qmin + shift, qt.qmax + shift
        d = torch.round(8 - zero).clamp(-lo, 15 - hi)  # (out, ngroups)
        codes = codes + d.to(torch.int32).repeat_interleave(group, dim=1)
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        )
        sz = torch.stack([scale.T, ((8 - zero - d) * scale).T], dim=-1)  # (ngroups, out, 2)
        self.register_buffer("scales_zeros", sz.to(dtype).contiguous())
        self.group = group

    def _lowbit(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)

    def _dq_codes(self) -> torch.Tensor:
        return self.dq_codes


class DenseLinear(_WeightOnly):
    """Any weight-only ``QuantLinear`` as a dense copy of its dequantized weight in ``dtype``.

    For formats no low-bit kernel takes (8-bit group-wise, codebooks) in a bfloat16 model:
    the artifact stays packed, the run-time copy costs 2 bytes per weight (with
    ``hold_dense=False``, uniform grids only: a temporary copy per call, the codes held).
    """

    def __init__(
        self, layer: QuantLinear, dtype: torch.dtype = torch.bfloat16, hold_dense: bool = True
    ) -> None:
        super().__init__()
        if layer.input_quantizer is not None:
            raise ValueError("DenseLinear takes weight-only layers")
        if not hold_dense and getattr(layer, "weight_levels", None) is not None:
            raise ValueError("DenseLinear(hold_dense=False) needs a uniform grid, not a codebook")
        self._setup(layer, dtype, 1, hold_dense)
        if not hold_dense:
            self.register_buffer("dq_codes", layer.weight_codes.clone(), persistent=False)

    def _dq_codes(self) -> torch.Tensor:
        return self.dq_codes
