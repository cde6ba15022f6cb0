"""Direct kernels of the compiled extension as plan-runner calls (``deployment/runner.py``).

Each ``*_call(module)`` returns a closure with every constant argument bound that computes the
lowered module's output on one of the extension's kernels (``kernels/csrc``): the
one-input-channel first convolution (``small_conv``), TTQ's two-term convolution
(``term_conv``) and one-term plain and linear layers on it (1x1 convolutions on its
``pointwise`` tiles), a small head's int8 linear layer (``small_linear``) and a whole
squeeze-excitation block (``SqueezePlan``); depthwise convolutions and whole inverted-residual
blocks are in :mod:`compactnn.deployment.depthwise`, a layer fused with its Hardswish in
:mod:`compactnn.deployment.hardswish`, the cheap operations on codes (quantize, pool, gate,
max-pool) in :mod:`compactnn.deployment.codes`. Every one gives the outputs of
the module it replaces, bit for bit (the tests beside each kernel); the runner's module
docstring says why each exists and what it measured. ``*_fits`` say whether a module can run
on one; the runner chooses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compactnn.deployment.codes import code_grid
from compactnn.deployment.lowbit import SplitConv2d, code_bounds
from compactnn.deployment.onednn import CL, Int8Conv2d, Int8Linear
from compactnn.kernels import bitconv
from compactnn.measure.environment import cpu_description

SMALL_OUT = (16, 32, 48, 64)  # output channels the direct kernel keeps in vector registers


def small_conv_fits(m: nn.Module) -> bool:
    """Whether ``m`` runs on the direct one-input-channel kernel (builds the extension once)."""
    if not isinstance(m, Int8Conv2d) or m.accum is not None or m.groups != 1:
        return False
    o, c, kh, kw = m.w_int8.shape
    # exact float sums need |acc| <= taps * 255 * 128 < 2^24 (taps <= 49 here)
    if c != 1 or o not in SMALL_OUT or kh * kw > 49 or m.unary not in ("none", "relu", "hardtanh"):
        return False
    return bitconv.available()


def small_conv_call(m: Int8Conv2d, fused: tuple | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``m.forward`` on the direct kernel; ``fused``: the grid ``(scale, zero[, lo, hi])`` of
    the quantization it absorbs (the closure then takes the float input)."""
    ext = bitconv.load_extension()
    w = m.w_int8.float()  # (O, 1, KH, KW) int8 codes
    wt = w.permute(1, 2, 3, 0).reshape(-1, w.shape[0]).contiguous()  # (taps, O)
    sx, zx = m.x_qp
    mult = m.w_scale_t.float().reshape(-1).contiguous()  # (acc * sx) * w_scale: oneDNN's order
    bias = None if m.bias is None else m.bias.float().contiguous()
    unary = None if m.unary == "none" else (m.unary, list(m.scalars))
    if m.out is None:  # float output: the ReLU / Hardtanh as a clamp
        inf = float("inf")
        lo, hi = {"none": (-inf, inf), "relu": (0.0, inf)}.get(m.unary, tuple(m.scalars[:2]))
        o_scale, o_zero = 0.0, 0
    else:
        lo, hi = code_bounds(unary, m.out)
        o_scale, o_zero = m.out[0], m.out[1]
    in_lo, in_hi = (0, 255) if fused is None or len(fused) == 2 else fused[2:4]
    args = (
        sx, zx, in_lo, in_hi, wt, mult, bias, 1, w.shape[2], w.shape[3],
        m.stride, m.padding, m.dilation, o_scale, o_zero, float(lo), float(hi), float(sx),
    )  # fmt: skip

    def conv(x: torch.Tensor) -> torch.Tensor:
        if fused is not None and x.dtype != torch.float32:
            x = x.float()  # the quantizer's x.float()
        return ext.small_conv(x, *args)

    return conv


SMALL_LINEAR_WEIGHTS = 64 * 1024  # beyond this a GEMM kernel's blocking pays for its call


def small_linear_fits(m: nn.Module) -> bool:
    """Whether Int8Linear ``m`` runs on the direct ``small_linear`` kernel: a small head with a
    float output (oneDNN's int8 GEMM spent ~50 us on mnist-cnn's 16 x 64 x 10 at batch 16).
    Exact float sums need ``in * 255 * 128 < 2^24``."""
    if not isinstance(m, Int8Linear) or m.out is not None or m.unary not in ("none", "relu"):
        return False
    o, k = m.w_int8.shape
    return o * k <= SMALL_LINEAR_WEIGHTS and k * 255 * 128 < 2**24 and bitconv.available()


def small_linear_call(m: Int8Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``m.forward`` on the direct kernel: (..., in) uint8 codes -> (..., out) float32."""
    ext = bitconv.load_extension()
    sx, zx = m.x_qp
    wt = m.w_int8.float().t().contiguous()  # (in, out)
    ws = m.w_scale_t.float().reshape(-1).contiguous()
    bias = None if m.bias is None else m.bias.float().contiguous()
    relu = m.unary == "relu"

    def linear(q: torch.Tensor) -> torch.Tensor:
        y = ext.small_linear(q.reshape(-1, q.shape[-1]), sx, zx, wt, ws, bias, relu)
        return y.reshape(*q.shape[:-1], y.shape[-1])

    return linear


TERM_COLUMNS = (16, 32, 48, 64, 80, 96, 112, 128)  # terms * outputs held in registers
WIDE_COLUMNS = 2048  # above 128 columns: blocks of at most 128 (term_conv_pack), at most this many


def term_conv_fits(m: nn.Module) -> bool:
    """Whether split layer ``m`` runs on the direct two-term VNNI kernel ``term_conv``
    (builds the extension). Plain int8 layers: :func:`plain_conv_fits`."""
    if not isinstance(m, SplitConv2d):
        return False
    k = m.kernel
    if k.unary != "none" or k.out is not None or k.accum is not None or k.groups != 1:
        return False
    post = "none" if m.unary is None else m.unary[0]
    if post not in ("none", "relu", "hardtanh") or k.w_int8.shape[0] not in TERM_COLUMNS:
        return False
    return bitconv.available() and bitconv.load_extension().has_vnni()


def out_args(out, unary) -> tuple[float, int, float, float]:
    """``(out_scale, out_zero, lo, hi)`` of the direct kernels: codes clamped to the bounds
    that apply ``unary`` and the grid, or (scale 0) a float output clamped by ``unary``."""
    if out is None:  # float output: the ReLU / Hardtanh as a clamp
        inf = float("inf")
        name, scalars = unary if unary is not None else ("none", [])
        lo, hi = {"none": (-inf, inf), "relu": (0.0, inf)}.get(name, tuple(scalars[:2]))
        return 0.0, 0, float(lo), float(hi)
    lo, hi = code_bounds(unary, out)
    return float(out[0]), int(out[1]), float(lo), float(hi)


def term_conv_call(m: SplitConv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    """``m.forward`` on the direct kernel: (N, C, H, W) uint8 codes -> codes or float."""
    ext = bitconv.load_extension()
    k, o = m.kernel, m.channels
    sx, zx = k.x_qp
    packed, corr = ext.term_conv_pack(k.w_int8, int(zx))
    mult = k.w_scale_t.float().reshape(-1).contiguous()  # (dot * sx) * w_scale: oneDNN's order
    bias = None if k.bias is None else k.bias[:o].float().contiguous()  # term 0 carries it
    kh, kw = k.w_int8.shape[2:]
    args = (
        int(zx), packed, corr, mult, bias, 2, kh, kw, list(k.stride), list(k.padding),
        list(k.dilation), *out_args(m.out, m.unary), float(sx),
    )  # fmt: skip

    def conv(q: torch.Tensor) -> torch.Tensor:
        return ext.term_conv(q, *args)

    return conv


# Per-call work (multiply-accumulates) up to which a plain int8 convolution runs on
# ``term_conv`` with one term. Measured per layer, 2 threads, AMD Zen 4 (bit-identical
# outputs): at batch 1 oneDNN spends ~40 us per call on mnist-cnn's 1-2 M MAC layers and
# 40-110 us on ResNet-18's 0.5-9.4 M MAC layers at 64x64, the direct kernel 8-48 us
# (1.5-5x); at 14-29 M MACs (mnist-cnn, batch 16) 1.1-1.6x; from ~38 M MACs (ResNet-18 64x64,
# batch 8) oneDNN's blocking wins (0.81-0.98x).
PLAIN_MACS = 32_000_000
# On a CPU with AMX tiles oneDNN's int8 convolution is several times faster per MAC, so only
# calls small enough for its fixed cost to dominate move; an estimate (no AMX machine was
# available to measure it): ~40 us of oneDNN overhead against the VNNI kernel's ~4 us per M MACs.
PLAIN_MACS_AMX = 4_000_000


@functools.cache
def _has_amx() -> bool:
    return cpu_description().endswith(", AMX")


def plain_macs_limit() -> int:
    """:data:`PLAIN_MACS`, or :data:`PLAIN_MACS_AMX` on a CPU with AMX tiles."""
    return PLAIN_MACS_AMX if _has_amx() else PLAIN_MACS


# A stride-1, unpadded 1x1 layer with codes out (no float residual, no Hardswish) and input
# channels a multiple of 4 runs on ``term_conv``'s tile-in-registers path (``pointwise.cpp``:
# no padded copy, no int32 round trip) at every size on a CPU without AMX. Measured alone on
# MobileNetV2's shapes, batch 8, AMD Zen 4, 2 threads (equal codes): 16 -> 96 at 112x112
# 1.07-1.2x oneDNN, 144 -> 32 at 28x28 1.5x, 576 -> 160 at 7x7 1.8x, 96 -> 24 at 56x56 1.2x.
def pointwise(m: Int8Conv2d) -> bool:
    """Whether ``m`` takes ``term_conv``'s 1x1 path (see above) whatever its size."""
    _, c, kh, kw = m.w_int8.shape
    return (
        (kh, kw) == (1, 1)
        and tuple(m.stride) == (1, 1)
        and tuple(m.padding) == (0, 0)
        and c % 4 == 0
        and m.out is not None
        and m.accum != "float"
        and not _has_amx()
    )


def plain_conv_fits(m: nn.Module) -> bool:
    """Whether plain int8 convolution ``m`` can run on ``term_conv`` with one term: no
    residual sum, a float32 one into a float output (the default deploy's residual add) or a
    uint8 one into codes (quantized residuals), then ReLU or none; one group; outputs padded
    to 16 up to 128 (:data:`TERM_COLUMNS`), or 129-2,048 (blocks of at most 128); a ReLU / Hardtanh
    or no post-op; symmetric weights and a VNNI build.
    :func:`plain_conv_call` still picks oneDNN for large calls."""
    if not isinstance(m, Int8Conv2d) or m.groups != 1:
        return False
    if m.accum is not None and (m.accum == "float") != (m.out is None):
        return False  # mixed sums (float into codes, codes into float): not probed
    if m.accum is not None and m.unary not in ("none", "relu"):
        return False  # oneDNN fuses only sum and sum + ReLU
    o = m.w_int8.shape[0]
    wide = 128 < o <= WIDE_COLUMNS  # blocks of at most 128 columns (term_conv_pack)
    columns = -(-o // 16) * 16  # outputs padded to a vector of 16
    if m.unary not in ("none", "relu", "hardtanh") or not (wide or columns in TERM_COLUMNS):
        return False
    if bool(m.w_zero.any()):
        return False
    return bitconv.available() and bitconv.load_extension().has_vnni()


def term_conv_plan(m: Int8Conv2d | Int8Linear, hardswish: tuple | None = None) -> Any:
    """The extension's ``TermConvPlan`` of plain int8 convolution ``m`` (one term; see
    :func:`plain_conv_fits`) or of linear layer ``m`` as a 1x1 convolution: its packed weight,
    scales, geometry and output grid bound once. ``hardswish``: see ``hardswish.hardswish_call``."""
    ext = bitconv.load_extension()
    sx, zx = m.x_qp
    if isinstance(m, Int8Linear):  # (out, in) -> (out, in, 1, 1), stride 1, no padding
        w, geometry = m.w_int8[:, :, None, None], ([1, 1], [0, 0], [1, 1])
    else:
        w, geometry = m.w_int8, (list(m.stride), list(m.padding), list(m.dilation))
    packed, corr = ext.term_conv_pack(w, int(zx))
    mult = m.w_scale_t.float().reshape(-1).contiguous()
    bias = None if m.bias is None else m.bias.float().contiguous()
    _, _, kh, kw = w.shape
    unary = None if m.unary == "none" else (m.unary, list(m.scalars))
    out = out_args(m.out, unary)  # with a residual the kernel clamps after the sum
    if hardswish is not None:
        out = hardswish_out(hardswish)
    return ext.TermConvPlan(
        int(zx), packed, corr, mult, bias, kh, kw, *geometry, *out, float(sx),
        hardswish is not None,
    )  # fmt: skip


def plain_conv_call(
    m: Int8Conv2d, onednn: Callable[..., torch.Tensor], hardswish: tuple | None = None
) -> Callable[..., torch.Tensor]:
    """``m.forward`` on ``term_conv`` with one term when a call's work is at most
    :func:`plain_macs_limit`, else on ``onednn`` (the layer's oneDNN closure); equal outputs
    either way (the same integer dots and oneDNN's float order ``(dot * sx) * w_scale +
    bias``; with a residual, oneDNN's sum post-op ``fma(acc - acc_zero, acc_scale, ...)``,
    then the ReLU; codes ``nearbyint(y * (1 / out_scale) + out_zero)``). ``hardswish``: see
    ``hardswish.hardswish_call``."""
    plan = term_conv_plan(m, hardswish)
    o, c, kh, kw = m.w_int8.shape
    per_pixel, limit = o * c * kh * kw, plain_macs_limit()
    if hardswish is None and pointwise(m):
        limit = None  # every size (the input is dense channels-last codes in the runner)
    (sh, sw), (ph, pw), (dh, dw) = m.stride, m.padding, m.dilation
    direct: dict[tuple[int, ...], bool] = {}  # input shape -> whether it runs here

    def small(shape: torch.Size) -> bool:
        use = direct.get(shape)
        if use is None:
            n, _, h, w = shape
            oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            use = limit is None or n * oh * ow * per_pixel <= limit
            if len(direct) >= 8:
                direct.clear()
            direct[shape] = use  # (a local result: another thread may clear the cache)
        return use

    def conv(q: torch.Tensor) -> torch.Tensor:
        if not small(q.shape):
            return onednn(q)
        return plan(q)

    if m.accum is None:
        return conv
    a_scale, a_zero = (1.0, 0) if m.accum == "float" else m.accum
    a_scale, a_zero = float(a_scale), int(a_zero)

    def conv_sum(q: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        if not small(q.shape):
            return onednn(q, acc)
        return plan.sum(q, acc.contiguous(memory_format=CL), a_scale, a_zero)

    return conv_sum


def hardswish_out(hardswish: tuple) -> tuple[float, int, float, float]:
    """``(out_scale, out_zero, lo, hi)`` of a kernel that ends with Hardswish: ``()`` for a
    float output, else the grid ``(scale, zero, lo, hi)`` of the quantization after it."""
    if hardswish == ():  # float Hardswish output
        return 0.0, 0, -float("inf"), float("inf")
    scale, zero, lo, hi = hardswish
    return float(scale), int(zero), float(lo), float(hi)


def plain_linear_fits(m: nn.Module) -> bool:
    """Whether Int8Linear ``m`` can run on ``term_conv`` as a 1x1 convolution of one row:
    up to 2,048 outputs (nearly equal blocks of at most 128 columns, split between the
    threads), a ReLU / Hardtanh or no post-op, symmetric weights and a VNNI build (oneDNN's
    int8 GEMM spent ~55 us on ResNet-18's 512 x 1000 head at batch 1; the direct kernel
    ~10 us)."""
    if not isinstance(m, Int8Linear) or m.unary not in ("none", "relu", "hardtanh"):
        return False
    o = m.w_int8.shape[0]
    fits = -(-o // 16) * 16 in TERM_COLUMNS or 128 < o <= WIDE_COLUMNS
    if not fits or bool(m.w_zero.any()):
        return False
    return bitconv.available() and bitconv.load_extension().has_vnni()


def plain_linear_call(
    m: Int8Linear, onednn: Callable[[torch.Tensor], torch.Tensor], hardswish: tuple | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``m.forward`` on ``term_conv`` (a 1x1 convolution of (1, in, 1, N)) when a call's work
    is at most :func:`plain_macs_limit`, else ``onednn``; equal outputs either way (oneDNN's
    int8 GEMM scales and requantizes in the convolution's order). ``hardswish``: see
    ``hardswish.hardswish_call`` (``onednn`` is then the separate calls)."""
    plan = term_conv_plan(m, hardswish)
    o, k = m.w_int8.shape
    rows = plain_macs_limit() // (o * k)  # rows per call up to which it runs here

    def linear(q: torch.Tensor) -> torch.Tensor:
        n = q.numel() // k
        if n > rows:
            return onednn(q)
        # the rows as the pixels of one image row (1, in, 1, N), channels-last: the kernel's
        # pixel blocks then share each weight load (as N images of one pixel, every row read
        # the whole weight: mnist-cnn's head at batch 16 ran slower than oneDNN's GEMM)
        pixels = q.reshape(1, 1, n, k).permute(0, 3, 1, 2)
        y = plan(pixels)  # (1, O, 1, N), channels-last
        return y.permute(0, 2, 3, 1).reshape(*q.shape[:-1], o)

    return linear


def squeeze_fits(fc1: nn.Module, fc2: nn.Module) -> bool:
    """Whether the two 1x1 convolutions of a squeeze-excitation block can run inside one
    ``SqueezePlan`` call: both plain (:func:`plain_conv_fits`, no residual), unpadded and
    unstrided, the first writing codes, the second a float gate input with no post-op."""
    for m in (fc1, fc2):
        if not plain_conv_fits(m) or m.accum is not None or m.w_int8.shape[2:] != (1, 1):
            return False
        if tuple(m.stride) != (1, 1) or tuple(m.padding) != (0, 0):
            return False
    return fc1.out is not None and fc2.out is None and fc2.unary == "none"


def squeeze_call(
    pool_quant: nn.Module,
    fc1: Int8Conv2d,
    fc2: Int8Conv2d,
    gate_quant: nn.Module,
    unfused: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A whole squeeze-excitation block, ``gate_quant(Hardsigmoid(fc2(fc1(pool_quant(x)))) *
    x)``, as one call of the extension's ``SqueezePlan`` (the same four kernels the runner calls
    one by one, chained in C++: equal codes) for float32 channels-last ``x`` while the 1x1
    convolutions stay within :func:`plain_macs_limit`; ``unfused(x)`` otherwise."""
    ext = bitconv.load_extension()
    plan = ext.SqueezePlan(
        *code_grid(pool_quant), term_conv_plan(fc1), term_conv_plan(fc2), *code_grid(gate_quant)
    )
    per_image = max(int(fc1.w_int8[:, :, 0, 0].numel()), int(fc2.w_int8[:, :, 0, 0].numel()))
    rows = plain_macs_limit() // per_image

    def squeeze(x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() == 4
            and x.dtype == torch.float32
            and x.shape[0] <= rows
            and x.is_contiguous(memory_format=CL)
        ):
            return plan(x)
        return unfused(x)

    return squeeze
