"""Frozen binary blocks (XNOR-Net, Bi-Real, ReActNet) on integer kernels.

A frozen :class:`~compactnn.engines.binary.BinaryBlock` computes, per output channel ``o``::

    y = conv(sign(x - shift), alpha_o * s) [* K for XNOR] * g_o + b_o [+ shortcut(x)] [-> RPReLU]

with ``s`` the ``+-1`` weight codes, ``alpha`` the per-filter codebook and ``g = gain * scale``.
:func:`lower_binary_blocks` replaces each block by a :class:`DeployedBinaryBlock` whose
convolution runs on integers:

- ``"int8"``: ``sign(x - shift)`` as uint8 codes 127 / 129 (scale 1, zero point 128, so
  ``q - 128 = -1 / +1``; zero padding reads the zero point, i.e. 0, as the simulation's
  padded ``+-1`` tensor does), ``s`` as int8, on oneDNN's int8 convolution or linear
  (``torch.ops.onednn``); the integer dot is exact and oneDNN applies ``alpha * g`` and
  ``b`` as its per-channel output scale and bias (XNOR keeps ``alpha`` there and applies
  ``K``, ``g`` and ``b`` after).
- ``"popcount"``: the bit-packed XNOR/popcount convolution of
  :mod:`compactnn.kernels.bitconv` (compiled on first use), same scale and bias.
- ``"float"``: PyTorch's float convolution of the ``+-1`` values and weights; its dots are
  exact integers too (``|dot| < 2^24``), then the same scale and bias. On tiny layers its one
  call can beat the integer kernels.

All three reproduce the simulation up to float rounding of the final scale (the dot products
are identical). The shortcut, RPReLU and a ReLU that follows the block in an
``nn.Sequential`` (absorbed) run as ONE in-place pass of the compiled extension over the
kernel's channels-last output (``binary_tail``, the same float operations in the same order
as the PyTorch ops, which remain the fallback; a stride-2 shortcut's 2x2 average is read in
that pass too), and the int8 kernel's sign codes come from
one pass (``sign_codes``); XNOR's ``K`` stays PyTorch ops. ``kernel="auto"`` times every
kernel on each block's input from ``example`` with its elementwise tail included and keeps
the fastest per block (no popcount when the extension cannot be built).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.calib import call_model
from compactnn.engines.binary import BinaryBlock, real_shortcut, rprelu, xnor_scale
from compactnn.errors import CompactnnError, user_stacklevel
from compactnn.kernels import bitconv
from compactnn.lowering.graph import conv_padding
from compactnn.lowering.verify import compare
from compactnn.measure.timing import TimingWarning, time_blocks

CL = torch.channels_last
KERNELS = ("auto", "int8", "popcount", "float")
PACKED_SHAPES = 4  # oneDNN weight layouts kept per layer, one per recent input shape


def binary_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(+-1 codes as int8, alpha (out,))`` of a frozen 1-bit layer with codebook ``[-a, +a]``."""
    levels = getattr(layer, "weight_levels", None)
    codes = getattr(layer, "weight_codes", None)
    if levels is None or codes is None:
        raise CompactnnError(
            "binary block: its layer is not frozen to 1-bit codes with a codebook; call "
            "compactnn.train(...) (which freezes) or block.freeze() before deploying."
        )
    lv = levels.reshape(levels.shape[0], -1)  # (out, 2): code 0 -> lv[:, 0], 1 -> lv[:, 1]
    if lv.shape[1] != 2 or not torch.equal(lv[:, 0], -lv[:, 1]):
        raise CompactnnError(
            "binary block: the layer's codebook is not [-alpha, +alpha] per filter; only "
            "symmetric binary weights run on the integer kernels."
        )
    w = codes.to(torch.int8).mul(2).sub(1).to(torch.int8)  # 0/1 -> -1/+1
    return w, lv[:, 1].float().clone()


def _grouped(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups != 1


def _padding(layer: nn.Module) -> list[int]:
    """The layer's padding as integers (``"valid"`` / symmetric ``"same"``), or a refusal."""
    pads = conv_padding(layer)
    if isinstance(pads, str):
        raise CompactnnError(f"binary block: {pads}.")
    return pads


class _OneDnnBinary(nn.Module):
    """oneDNN int8 conv/linear on +-1 codes (uint8, zero point 128); float32 output."""

    def __init__(self, w: torch.Tensor, out_scale, bias, layer: nn.Module) -> None:
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        self.register_buffer("w_int8", w)
        self.register_buffer("out_scale", out_scale.float().contiguous())
        self.register_buffer("w_zero", torch.zeros(w.shape[0], dtype=torch.int64))
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        if self.conv:
            self.geo = ([*layer.stride], _padding(layer), [*layer.dilation], layer.groups)
        self._packed: dict[tuple[int, ...], torch.Tensor] = {}

    def _packed_for(self, shape: tuple[int, ...]) -> torch.Tensor:
        packed = self._packed.get(shape)
        if packed is None:  # packed per input shape (see deployment/onednn.py for why)
            if len(self._packed) >= PACKED_SHAPES:
                self._packed.pop(next(iter(self._packed)))
            if self.conv:
                packed = torch.ops.onednn.qconv_prepack(
                    self.w_int8, self.out_scale, 1.0, 128, *self.geo, list(shape)
                )
            else:
                packed = torch.ops.onednn.qlinear_prepack(self.w_int8, list(shape))
            self._packed[shape] = packed
        return packed

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        packed = self._packed_for(tuple(q.shape))
        if self.conv:  # (N, C, H, W) uint8 channels-last
            return torch.ops.onednn.qconv_pointwise(
                q, 1.0, 128, packed, self.out_scale, self.w_zero, self.bias, *self.geo,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        return torch.ops.onednn.qlinear_pointwise(
            q, 1.0, 128, packed, self.out_scale, self.w_zero, self.bias,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip


class _FloatBinary(nn.Module):
    """The float kernel: ``sign(x - shift)`` as float +-1 through PyTorch's float convolution
    (or linear) with the +-1 weights; each dot is an exact integer (|dot| < 2^24), then
    ``* out_scale + bias``. On tiny layers its single call can beat the integer kernels."""

    def __init__(self, w, out_scale, bias, layer: nn.Module, zero_one: bool = False) -> None:
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        self.low = 0.0 if zero_one else -1.0  # the activation's value where x - shift < 0
        self.register_buffer("w_pm1", w.float().contiguous())
        self.register_buffer("out_scale", out_scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        if self.conv:
            self.geo = (layer.stride, _padding(layer), layer.dilation, layer.groups)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        s = torch.where(xs >= 0, 1.0, self.low)  # sign(0) = +1 (NaN -> low) as simulated
        if self.conv:
            y = nn.functional.conv2d(s, self.w_pm1, None, *self.geo)
            y = y.mul_(self.out_scale.reshape(1, -1, 1, 1))
            return y if self.bias is None else y.add_(self.bias.reshape(1, -1, 1, 1))
        y = nn.functional.linear(s, self.w_pm1).mul_(self.out_scale)
        return y if self.bias is None else y.add_(self.bias)


def _pool_to(x: torch.Tensor, size) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, size)``, bit for bit; a stride-2 shortcut (exact halving) runs
    as a 2x2 average pool, measured 1.2-1.8x faster channels-last (larger windows can round
    differently, so they keep the adaptive pool)."""
    (h, w), (oh, ow) = x.shape[-2:], size
    if (h, w) == (2 * oh, 2 * ow):
        return F.avg_pool2d(x, 2, 2)
    return F.adaptive_avg_pool2d(x, size)


def _fast_ops():
    """The compiled extension when it loads (fused sign codes and block tail), else None."""
    return bitconv.load_extension() if bitconv.available() else None


class DeployedBinaryBlock(nn.Module):
    """A frozen binary block whose convolution / linear layer runs on integer kernels.

    Args:
        block: a frozen ``BinaryBlock`` (batch norm folded, 1-bit codes).
        kernel: ``"int8"`` (oneDNN), ``"popcount"`` (bit-packed, C++ extension) or
            ``"float"`` (PyTorch's float kernel on the +-1 values: exact integer dots too).
        relu: also apply the ReLU that follows the block in the model (absorbed by
            :func:`lower_binary_blocks`), in the same pass as the shortcut and RPReLU.

    Where the extension loads, the elementwise work around the kernel is fused: the int8
    kernel's sign codes come from one pass (``sign_codes``) and the shortcut add, RPReLU and
    ReLU of a convolution block are one in-place pass over its output (``binary_tail``), with
    the same float operations in the same order as the PyTorch ops they replace.

    Example:
        >>> fast = DeployedBinaryBlock(frozen_block, "int8")  # doctest: +SKIP
    """

    deploy_leaf = True  # the deploy tracer keeps this module whole

    def __init__(self, block: BinaryBlock, kernel: str = "int8", relu: bool = False) -> None:
        super().__init__()
        if kernel not in ("int8", "popcount", "float"):
            raise CompactnnError(f"binary kernel {kernel!r}: use 'int8', 'popcount' or 'float'.")
        if block.weight_quantizer is not None or block.norm is not None:
            raise CompactnnError("binary block is still training: freeze it before deploying.")
        # sibnn's {0,1} activations: a = 1[x - shift >= 0], the codes 128 + a (zero point 128,
        # so padding reads 0 as the simulation's zero-padded tensor); popcount is +-1 only
        self.zero_one = getattr(getattr(block, "act", None), "levels", "pm1") == "01"
        if self.zero_one and kernel == "popcount":
            raise CompactnnError(
                "binary block with {0,1} activations (w1a1-sibnn): the popcount kernel computes "
                "+-1 dots; deploy it with kernel='int8', 'float' or 'auto'."
            )
        layer = block.layer
        if kernel == "popcount" and _grouped(layer):
            raise CompactnnError(
                f"binary block on a grouped convolution (groups={layer.groups}): the popcount "
                "kernel runs groups=1 only; deploy it with kernel='int8', 'float' or 'auto'."
            )
        self.kind, self.kernel, self.conv, self.relu = block.kind, kernel, block.conv, relu
        self.shortcut = block.shortcut
        w, alpha = binary_weight(layer)
        g = (block.gain * block.scale).detach().float()
        bias = None if layer.bias is None else layer.bias.detach().float()
        self.register_buffer("shift", block.shift.detach().float().clone())
        self.fold = self.kind != "xnor"  # XNOR's K sits between the conv and the gain
        out_scale = alpha * g if self.fold else alpha
        self.register_buffer("out_scale", out_scale)
        self.register_buffer("out_bias", bias if self.fold else None)
        self.register_buffer("gain", None if self.fold else g)
        self.register_buffer("bias", None if self.fold else bias)
        post = block.post
        self.rprelu = None if post is None else tuple(
            p.detach().float().clone() for p in (post.gamma, post.zeta, post.slope)
        )  # fmt: skip
        self.geometry = None
        if self.conv and self.kind == "xnor":  # K's box filter needs only the geometry
            self.geometry = nn.Conv2d(
                1, 1, layer.kernel_size, layer.stride, _padding(layer), layer.dilation, bias=False
            )
        if kernel == "popcount":
            w4 = w if self.conv else w.reshape(*w.shape, 1, 1)
            geo = (
                (layer.stride, _padding(layer), layer.dilation)
                if self.conv
                else ((1, 1), (0, 0), (1, 1))
            )
            self.core = bitconv.BitConv2d(w4 > 0, *geo)
        elif kernel == "float":
            self.core = _FloatBinary(w, out_scale, self.out_bias, layer, self.zero_one)
        else:
            self.core = _OneDnnBinary(w, out_scale, self.out_bias, layer)
        self.selection: dict[str, float | str] = {"kernel": kernel}

    @property
    def ext(self):
        """The extension's fused ops, or None (PyTorch ops then; not stored: deep-copies)."""
        return _fast_ops()

    def _cview(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.reshape(1, -1, *([1] * (ndim - 2))) if self.conv else t

    def _integer_layer(self, x: torch.Tensor, xs: torch.Tensor | None) -> torch.Tensor:
        if self.kernel == "popcount":  # the kernel packs sign(x - shift) itself
            x4 = x if self.conv else x.reshape(-1, x.shape[-1], 1, 1)
            y = self.core(x4, self.shift, self.out_scale, self.out_bias)
            return y if self.conv else y.reshape(*x.shape[:-1], -1)
        if self.kernel == "float":
            return self.core(xs)
        if xs is None:
            q = self.ext.sign_codes(x, self.shift)  # one pass, channels-last uint8
        else:
            # sign(x - shift) as uint8 codes: 129 (+1) where xs >= 0 (sign(0) = +1), 127 (-1);
            # {0,1} activations: 129 (1) and 128 (0)
            q = (xs >= 0).to(torch.uint8)
            q = q.add_(128) if self.zero_one else q.mul_(2).add_(127)
        if self.conv:
            return self.core(q.contiguous(memory_format=CL))
        y = self.core(q.reshape(-1, q.shape[-1]))
        return y.reshape(*x.shape[:-1], -1)

    def _fused_tail(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Shortcut, RPReLU and ReLU as one in-place pass of the extension, or None."""
        ext = self.ext
        if ext is None or not self.conv or not self.fold or y.dtype != torch.float32:
            return None
        nhwc = y.permute(0, 2, 3, 1)  # (N, OH, OW, O): the kernels write channels-last
        if not nhwc.is_contiguous():
            return None
        sc, rep, pool = None, 1, 1
        if self.shortcut:
            (h, w), (oh, ow) = x.shape[-2:], y.shape[-2:]
            cin, cout = x.shape[1], y.shape[1]
            if cout % cin == 0 and (h, w) == (2 * oh, 2 * ow) and x.dtype == torch.float32:
                sc, pool = x, 2  # the stride-2 shortcut's 2x2 average, in the same pass
            else:
                sc = x if (h, w) == (oh, ow) else _pool_to(x, y.shape[-2:])
            if cout % cin == 0:
                rep = cout // cin  # repeat_interleave: output channel o reads o // rep
            else:
                sc = real_shortcut(x, y, True)
            sc = sc.float()
        gamma, zeta, slope = self.rprelu if self.rprelu is not None else (None, None, None)
        ext.binary_tail(nhwc, sc, rep, gamma, slope, zeta, self.relu, pool)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused_codes = (
            self.kernel == "int8"
            and self.conv
            and x.dtype == torch.float32
            and self.ext is not None
            and not self.zero_one
        )
        xs = None
        if self.kernel == "float" or not self.fold or (self.kernel == "int8" and not fused_codes):
            xs = x - self._cview(self.shift, x.dim())
        y = self._integer_layer(x, xs)
        if not self.fold:  # XNOR: y = conv * K * g + b, the simulation's order
            if self.conv:
                y = y * xnor_scale(xs, self.geometry)
            else:
                y = y * xnor_scale(xs, nn.Identity())
            y = y * self._cview(self.gain, y.dim())
            if self.bias is not None:
                y = y + self._cview(self.bias, y.dim())
        fused = self._fused_tail(x, y)
        if fused is not None:
            return fused
        if self.shortcut:
            y = y + real_shortcut(x, y, self.conv)
        if self.rprelu is not None:
            y = rprelu(y, *self.rprelu, dim=1 if self.conv else -1)
        return y.relu_() if self.relu else y

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return f"kind={self.kind}, kernel={self.kernel}, shortcut={self.shortcut}{relu}"


def _block_inputs(model: nn.Module, names: list[str], example) -> dict[str, torch.Tensor]:
    """The input each named block receives when ``model`` runs on ``example``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: seen.setdefault(n, args[0].detach())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            call_model(model, example)  # a tuple as positional, a dict as keyword inputs
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise CompactnnError(f"binary blocks {missing} were not reached by `example`.")
    return seen


def _choose(
    name: str, block: BinaryBlock, x: torch.Tensor, threads: int | None, relu: bool = False
) -> DeployedBinaryBlock:
    """Build every kernel of one block, time each whole block (kernel and elementwise tail)
    on ``x`` and keep the fastest."""
    zero_one = getattr(getattr(block, "act", None), "levels", "pm1") == "01"
    # popcount computes +-1 dots only, with groups=1
    pop = bitconv.available() and not zero_one and not _grouped(block.layer)
    kinds = ("int8", "popcount", "float") if pop else ("int8", "float")
    cands = {k: DeployedBinaryBlock(block, k, relu) for k in kinds}
    if x.dim() == 4:  # deployed, a block reads the channels-last output of a kernel
        x = x.contiguous(memory_format=CL)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", TimingWarning)  # a noisy sample still ranks the two
        calls = {k: (lambda m=m: m(x)) for k, m in cands.items()}
        # blocks of about 20 ms: a block of sub-millisecond calls timed warm, not one cold call
        # after each pause (two cold calls chose float for mnist-cnn's last ReActNet block)
        times = time_blocks(calls, warmup=2, runs=6, threads=threads, pause_s=0.02, block_s=0.02)
    best = min(times, key=lambda k: times[k].median_s)
    chosen = cands[best]
    chosen.selection = {"kernel": best, **{f"{k}_ms": t.median_s * 1e3 for k, t in times.items()}}
    return chosen


def lower_binary_blocks(
    model: nn.Module,
    kernel: str = "auto",
    *,
    example=None,
    tolerance: float = 2.0,
    threads: int | None = None,
) -> nn.Module:
    """A copy of ``model`` with every frozen ``BinaryBlock`` on integer kernels.

    Args:
        model: a model holding frozen binary blocks (e.g. from ``compactnn.train`` with a
            ``w1a1-reactnet`` / ``-bireal`` / ``-xnor`` recipe); left untouched.
        kernel: ``"int8"`` (oneDNN), ``"popcount"`` (bit-packed C++ extension), ``"float"``
            (PyTorch's float kernel on the +-1 values) or ``"auto"``: per block, the
            fastest of them timed on its input from ``example``, elementwise tail included
            (int8 when no example is given; no popcount when the extension cannot be built).
        example: an input of ``model`` (a tensor or a tuple of arguments); needed for
            ``"auto"``, and used to verify every block against its simulation.
        tolerance: largest allowed gap per block, in steps of its output range / 255.
        threads: torch threads while ``"auto"`` times the kernels (None: current).

    Returns:
        The copy; ``copy.binary_kernels`` maps block names to their ``selection``.

    Example:
        >>> fast = lower_binary_blocks(trained, "auto", example=images[:8])  # doctest: +SKIP
    """
    if kernel not in KERNELS:
        raise CompactnnError(f"kernel={kernel!r}: use one of {KERNELS}.")
    out = copy.deepcopy(model)
    names = [n for n, m in out.named_modules() if isinstance(m, BinaryBlock)]
    if kernel == "popcount":
        bitconv.load_extension()  # raises a CompactnnError naming the missing compiler
    if kernel == "auto" and example is None:
        warnings.warn(
            "lower_binary_blocks: no example to time on; using int8.", stacklevel=user_stacklevel()
        )
        kernel = "int8"
    if kernel == "auto":
        bitconv.available(warn=True)  # say once why popcount is not a candidate
    inputs = _block_inputs(out, names, example) if example is not None else {}
    selection = {}
    for name in names:
        block = out.get_submodule(name)
        relu = _next_relu(out, name)  # a ReLU right after the block joins its fused tail
        if kernel == "auto":
            new = _choose(name, block, inputs[name], threads, relu is not None)
        else:
            new = DeployedBinaryBlock(block, kernel, relu is not None)
        if relu is not None:
            parent, index = relu
            parent[index] = nn.Identity()
        if name in inputs:
            ref = block if relu is None else nn.Sequential(block, nn.ReLU())
            check = compare(ref, new, inputs[name], f"binary block {name!r}", tolerance)
            if not check.passed:
                raise CompactnnError(f"binary block {name!r} diverges from its simulation: {check}")
        selection[name] = new.selection
        _set(out, name, new)
    out.binary_kernels = selection
    return out


def _next_relu(model: nn.Module, name: str) -> tuple[nn.Sequential, int] | None:
    """``(parent, index)`` of a ReLU that directly follows block ``name`` in an
    ``nn.Sequential`` (identities in between skipped; the Sequential feeds the block's output
    only to it), or None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    for i in range(keys.index(child) + 1, len(keys)):
        m = parent[i]
        if isinstance(m, nn.ReLU):
            return parent, i
        if not isinstance(m, (nn.Identity, nn.Dropout)):
            return None
    return None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def binary_block_names(model: nn.Module) -> list[str]:
    """Names of the frozen binary blocks in ``model`` (what :func:`pre_lower` replaces)."""
    return [n for n, m in model.named_modules() if isinstance(m, BinaryBlock)]


def pre_lower(sim: nn.Module, example) -> tuple[nn.Module, dict]:
    """``deploy``'s first step: binary blocks on integer kernels before the graph is traced.

    Returns ``(model, kernels)``: ``sim`` itself and ``{}`` when it holds no binary block,
    else :func:`lower_binary_blocks` of it (``kernel="auto"``, verified per block on
    ``example``) and each block's kernel choice.
    """
    if not binary_block_names(sim):
        return sim, {}
    lowered = lower_binary_blocks(sim, "auto", example=example)
    return lowered, lowered.binary_kernels
