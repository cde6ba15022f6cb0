"""int8 kernels of oneDNN (through PyTorch's ``torch.ops.onednn``) as small modules.

Activations are plain ``uint8`` tensors (channels-last for 4-D) whose ``(scale, zero)`` is
fixed at lowering time; weights are the layer's own integer codes, prepacked once. Each
convolution or linear layer computes ``acc = sum((x - zx) * w)`` in int32, then
``y = acc * sx * sw + bias`` (plus an optional residual sum and ReLU/Hardtanh), and writes
either uint8 codes of the next layer's input grid or float32.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.lowering.graph import QParams, conv_padding, input_qparams, int8_weight

CL = torch.channels_last
PACKED_SHAPES = 4  # weight layouts kept per convolution, one per recent input shape
# copy.deepcopy stops at the first prepacked weight with this reason, and so does pickle of
# the int8 graph alone (a whole DeployedModel refuses pickling first: refusals.NOT_PICKLABLE)
NOT_COPYABLE = (
    "a deployed model holds weights prepacked by oneDNN, which cannot be copied or pickled "
    "(copy.deepcopy, torch.save): save it with compactnn.save(deployed, path) and load it "
    "back with compactnn.load(path, model=...), which re-deploys and re-verifies it; for a "
    "second copy in memory, deploy the compressed model again "
    "(compactnn.deploy(deployed.source, example=...))."
)


def quantize_u8(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Float -> uint8 codes ``clamp(round(x / scale) + zero, 0, 255)``, channels-last if 4-D."""
    if x.dim() == 4:
        x = x.contiguous(memory_format=CL)
    # the simulation's formula, same op order (division, round-half-even), so codes match
    return (x.float() / qp[0]).round_().add_(qp[1]).clamp_(0, 255).to(torch.uint8)


def dequantize_u8(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """uint8 codes -> float ``(q - zero) * scale``."""
    return q.float().sub_(qp[1]).mul_(qp[0])


class Quantize(nn.Module):
    """Float -> uint8 codes of one grid."""

    def __init__(self, qp: QParams) -> None:
        super().__init__()
        self.qp = qp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_u8(x, self.qp)

    def extra_repr(self) -> str:
        return f"scale={self.qp[0]:.4g}, zero={self.qp[1]}"


class Dequantize(Quantize):
    """uint8 codes -> float."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize_u8(q, self.qp)


class ReluU8(Quantize):
    """ReLU on codes: ``max(q, zero)`` is the code of ``relu(x)`` on the same grid."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.clamp_min(self.qp[1])


class MaxPoolU8(nn.Module):
    """Max-pool on codes (max commutes with a monotone quantizer); runs through PyTorch's
    quantized max-pool because its plain-uint8 kernel rejects large channels-last inputs."""

    def __init__(self, kwargs: dict) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # quantized tensors are deprecated; still the fast path
            warnings.simplefilter("ignore", UserWarning)
            qt = torch._make_per_tensor_quantized_tensor(q, 1.0, 0)
        return nn.functional.max_pool2d(qt, **self.kwargs).int_repr()


def maxpool_kwargs(pool: nn.MaxPool2d | None, args: tuple, kwargs: dict) -> dict:
    """Keyword arguments of ``F.max_pool2d`` for a MaxPool2d module or a functional call."""
    if pool is not None:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        return {k: getattr(pool, k) for k in names}
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    out = dict(zip(names, args, strict=False))
    out.update({k: v for k, v in kwargs.items() if k != "return_indices"})
    return out


class _Int8Layer(nn.Module):
    """Shared state of the int8 conv and linear: grids, scales, bias, post-ops."""

    def __init__(self, layer: nn.Module, out: QParams | None, unary) -> None:
        super().__init__()
        self.x_qp = input_qparams(layer)
        w, self.w_scale = int8_weight(layer)
        self.register_buffer("w_scale_t", self.w_scale)
        self.register_buffer("w_zero", torch.zeros(w.shape[0], dtype=torch.int64))
        bias = layer.bias.detach().float().clone() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        self.out = out  # None: float32 output
        self.unary, self.scalars = unary if unary is not None else ("none", [])
        self.w_int8 = w  # kept for inspection (bit-identical codes), not used at run time
        self._packed_for: dict[tuple[int, ...], torch.Tensor] = {}

    def _prepack(self, shape: tuple[int, ...] | None) -> torch.Tensor:
        raise NotImplementedError

    def __reduce_ex__(self, protocol: int):
        # a prepacked weight is an opaque tensor with no storage: without this, deepcopy and
        # pickle fail deep inside torch with "Cannot access storage of OpaqueTensorImpl"
        raise CompactnnError(NOT_COPYABLE)

    def packed_for(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Weights in the layout oneDNN picks for this input shape.

        Packed without a shape, the layout can differ from the one the kernel chooses for
        the real input (e.g. 32- vs 64-channel blocks), and oneDNN then reorders the whole
        weight on *every* call (measured: 0.25 ms per 512x512x3x3 convolution and 1.3 ms for
        MobileNetV2's 1280x1000 classifier at batch 1). Packing once per input shape avoids
        that; the few most recent shapes are kept.
        """
        packed = self._packed_for.get(shape)
        if packed is None:
            if len(self._packed_for) >= PACKED_SHAPES:
                self._packed_for.pop(next(iter(self._packed_for)))
            packed = self._packed_for[shape] = self._prepack(shape)
        return packed

    def out_args(self) -> tuple[float, int, torch.dtype | None]:
        if self.out is None:
            return 1.0, 0, torch.float32
        return self.out[0], self.out[1], torch.uint8


class Int8Conv2d(_Int8Layer):
    """A quantized Conv2d on oneDNN int8, with optional residual sum and ReLU-like post-op."""

    def __init__(self, layer, out, unary=None, accum: QParams | str | None = None) -> None:
        super().__init__(layer, out, unary)
        padding = conv_padding(layer)
        if isinstance(padding, str):  # unsupported_reason keeps such a layer float first
            raise CompactnnError(f"Int8Conv2d: {padding}.")
        self.stride, self.padding = list(layer.stride), padding
        self.dilation, self.groups = list(layer.dilation), layer.groups
        self.packed = self._prepack(None)  # a generic layout; shapes seen get their own
        self.accum = accum  # None: no sum; "float": float32 accumulator; QParams: uint8 one

    def _prepack(self, shape: tuple[int, ...] | None) -> torch.Tensor:
        return torch.ops.onednn.qconv_prepack(
            self.w_int8, self.w_scale, *self.x_qp, self.stride, self.padding, self.dilation,
            self.groups, None if shape is None else list(shape),
        )  # fmt: skip

    def forward(self, q: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        geo = (self.stride, self.padding, self.dilation, self.groups)
        o_scale, o_zero, o_dtype = self.out_args()
        packed = self.packed_for(tuple(q.shape))
        if acc is None:
            return torch.ops.onednn.qconv_pointwise.default(
                q, *self.x_qp, packed, self.w_scale_t, self.w_zero, self.bias, *geo,
                o_scale, o_zero, o_dtype, self.unary, self.scalars, "",
            )  # fmt: skip
        # (N, C, H, W) channels-last; oneDNN writes the result into ``acc`` in place
        acc = acc.contiguous(memory_format=CL)
        a_scale, a_zero = (1.0, 0) if self.accum == "float" else self.accum
        unary = None if self.unary == "none" else self.unary
        return torch.ops.onednn.qconv2d_pointwise.binary(
            q, *self.x_qp, packed, self.w_scale_t, self.w_zero, acc, self.bias, *geo,
            o_scale, o_zero, o_dtype, a_scale, a_zero, "sum", 1.0, unary, self.scalars, "",
        )  # fmt: skip

    def extra_repr(self) -> str:
        out = "float32" if self.out is None else f"uint8{self.out}"
        return f"x=uint8{self.x_qp}, out={out}, post={self.unary}, sum={self.accum}"


class Int8Linear(_Int8Layer):
    """A quantized Linear on oneDNN int8 (input ``(N, in)`` uint8)."""

    def __init__(self, layer, out, unary=None) -> None:
        super().__init__(layer, out, unary)
        self.packed = self._prepack(None)  # a generic layout; shapes seen get their own

    def _prepack(self, shape: tuple[int, ...] | None) -> torch.Tensor:
        return torch.ops.onednn.qlinear_prepack(self.w_int8, None if shape is None else list(shape))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        lead = q.shape[:-1]
        q2 = q.reshape(-1, q.shape[-1])  # (N, in)
        o_scale, o_zero, o_dtype = self.out_args()
        packed = self.packed_for(tuple(q2.shape))
        y = torch.ops.onednn.qlinear_pointwise.default(
            q2, *self.x_qp, packed, self.w_scale_t, self.w_zero, self.bias,
            o_scale, o_zero, o_dtype, self.unary, self.scalars, "",
        )  # fmt: skip
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        out = "float32" if self.out is None else f"uint8{self.out}"
        return f"x=uint8{self.x_qp}, out={out}, post={self.unary}"
