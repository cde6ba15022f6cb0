"""The ``inductor`` deploy backend: compactnn's int8 graph compiled by ``torch.compile``.

The graph is the one the ``onednn`` backend runs (:func:`compactnn.deployment.lower.lower`
of the plan of ``lowering/plan.py``: compactnn's own grids, scales, zero points and int8
weight codes). For each input shape it is rewritten into a form Inductor takes
(:func:`inductor_graph`) and compiled with ``freezing=True``: every int8 convolution stays a
oneDNN ``qconv_pointwise`` kernel on weights prepacked for that shape (a graph constant),
and everything between the kernels (quantize / dequantize, residual sums, ReLU, hardswish,
squeeze-excitation, pooling) is fused into generated C++ loops.

Three forms change on the way, with the same integers:

- a convolution with a fused residual sum writes float32 ``acc * sx * sw + bias`` and the
  sum ``+ (codes - zero) * scale``, ReLU and requantization follow as ordinary ops (one
  fused loop). Inductor cannot take oneDNN's in-place sum post-op
  (``qconv2d_pointwise.binary``): functionalising it fails in torch 2.14;
- an int8 linear layer runs as a float linear on the dequantized codes and weights
  (``qlinear_pointwise`` refuses a frozen prepacked weight in torch 2.14);
- max-pooling on codes is Inductor's own loop over the uint8 tensor.

Compiling costs tens of seconds per input shape (measured on two heavily loaded cores:
33-73 s for ResNet-18, 166-192 s for MobileNetV3-Small) and needs a C++ compiler; the
compiled forms are kept per shape (:data:`SHAPES_KEPT` most recent). Measured against ONNX
Runtime's ``quantize_static`` on Zen 4 without AMX it was not faster at batch 1 or at 64x64
(``bench/deploy_inductor.py``, docs/deploy.md), so ``deploy(backend="auto")`` does not try it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

from compactnn.deployment.onednn import Int8Conv2d, Int8Linear, MaxPoolU8
from compactnn.errors import CompactnnError

SHAPES_KEPT = 4  # compiled graphs kept, one per recent input shape
_QCONV = torch.ops.onednn.qconv_pointwise.default


@contextlib.contextmanager
def quiet_build_log() -> Iterator[None]:
    """Hide torch's C++ build tools' warnings: importing ``torch.utils.cpp_extension`` (which
    Inductor does when it compiles) logs "No CUDA runtime is found, using CUDA_HOME=..." on
    a machine with an nvcc and no GPU, noise for a CPU backend (as ``measure.float_paths``)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def compiler_missing() -> str | None:
    """Why Inductor cannot build C++ here (no compiler found), or None when it can."""
    try:
        from torch._inductor import cpp_builder

        with quiet_build_log():
            cpp_builder.get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or an import failure on odd builds
        return (
            f"backend='inductor' compiles C++ with torch.compile, and no C++ compiler was "
            f"found ({type(e).__name__}): install one (e.g. 'apt-get install g++', or set "
            "CXX=/path/to/g++), or deploy with backend='onednn'."
        )
    return None


def _requantize(y: torch.Tensor, out: tuple) -> torch.Tensor:
    """Float -> uint8 codes of ``out = (scale, zero, dtype)``, the simulation's formula
    (division, round-half-even, zero point, clamp); a float32 output passes through."""
    if out[2] == torch.float32:
        return y
    return (y / out[0]).round().add(out[1]).clamp(0, 255).to(torch.uint8)


def _unary(y: torch.Tensor, name: str, scalars: list) -> torch.Tensor:
    if name == "relu":
        return y.relu()
    if name == "hardtanh":
        return y.clamp(float(scalars[0]), float(scalars[1]))
    if name != "none":
        raise CompactnnError(f"inductor backend: post-op {name!r} has no translation.")
    return y


class FrozenConv(nn.Module):
    """An :class:`Int8Conv2d` for one input shape, in a form Inductor compiles."""

    def __init__(self, m: Int8Conv2d, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.x_qp, self.out, self.accum = m.x_qp, m.out_args(), m.accum
        self.geo = (m.stride, m.padding, m.dilation, m.groups)
        self.unary, self.scalars = m.unary, m.scalars
        self.register_buffer("w_scale", m.w_scale_t)
        self.register_buffer("w_zero", m.w_zero)
        self.register_buffer("bias", m.bias)
        self.packed = m.packed_for(shape)  # a plain attribute: freezing makes it a constant

    def forward(self, q: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        args = (q, *self.x_qp, self.packed, self.w_scale, self.w_zero, self.bias, *self.geo)
        if acc is None:
            return _QCONV(*args, *self.out, self.unary, self.scalars, "")
        y = _QCONV(*args, 1.0, 0, torch.float32, "none", [], "")  # (N, C, H, W) float32
        if self.accum == "float":
            y = y + acc
        else:  # uint8 codes of the accumulator's grid
            y = y + (acc.float() - self.accum[1]) * self.accum[0]
        return _requantize(_unary(y, self.unary, self.scalars), self.out)


class FloatLinear(nn.Module):
    """An :class:`Int8Linear` as a float linear on the dequantized codes and weights."""

    def __init__(self, m: Int8Linear) -> None:
        super().__init__()
        self.x_qp, self.out, self.unary, self.scalars = m.x_qp, m.out_args(), m.unary, m.scalars
        # (out, in) float32: int8 codes times the per-channel scale, as the simulation
        self.register_buffer("weight", m.w_int8.float() * m.w_scale_t[:, None])
        self.register_buffer("bias", m.bias)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        x = (q.float() - self.x_qp[1]) * self.x_qp[0]
        y = nn.functional.linear(x, self.weight, self.bias)
        return _requantize(_unary(y, self.unary, self.scalars), self.out)


class PoolU8(MaxPoolU8):
    """Max-pooling on uint8 codes: Inductor generates the loop when compiling; run eagerly
    (a rewritten graph before compiling), PyTorch's quantized max-pool as in the onednn one."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return nn.functional.max_pool2d(q, **self.kwargs)
        return super().forward(q)


def inductor_graph(program: fx.GraphModule, args: tuple) -> fx.GraphModule:
    """The ``onednn`` backend's int8 graph rewritten for Inductor at the shapes of ``args``.

    Submodules that are not rewritten are shared with ``program``, which is not modified
    (its layers only gain weights packed for these shapes in their cache).
    """
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(mod: nn.Module, inputs: tuple) -> None:
        shapes[mod] = tuple(inputs[0].shape)

    kernels = [m for m in program.modules() if isinstance(m, Int8Conv2d | Int8Linear)]
    hooks = [m.register_forward_pre_hook(record) for m in kernels]
    try:
        with torch.no_grad():
            program(*args)
    finally:
        for h in hooks:
            h.remove()
    gm = fx.GraphModule(program, copy.deepcopy(program.graph))
    for name, m in list(gm.named_modules()):
        if isinstance(m, Int8Conv2d):
            new: nn.Module = FrozenConv(m, shapes[m])
        elif isinstance(m, Int8Linear):
            new = FloatLinear(m)
        elif isinstance(m, MaxPoolU8):
            new = PoolU8(m.kwargs)
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
    return gm


class InductorProgram(nn.Module):
    """The int8 graph, compiled by Inductor once per input shape on first use.

    Attributes:
        eager: the ``onednn`` backend's int8 graph it compiles (also used to localise a
            failed verification).
        compile_seconds: input shapes -> seconds the compile of that shape took.
    """

    def __init__(self, eager: fx.GraphModule) -> None:
        super().__init__()
        self.eager = eager
        self.compile_seconds: dict[tuple, float] = {}
        self.__dict__["_compiled"] = {}  # shapes -> compiled callable (not a submodule)

    def compiled_for(self, args: tuple) -> Callable[..., Any]:
        """The compiled graph for the shapes of ``args`` (compiled now if new)."""
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)
        fn = self._compiled.get(key)
        if fn is None:
            import torch._inductor.config as inductor_config

            if len(self._compiled) >= SHAPES_KEPT:
                self._compiled.pop(next(iter(self._compiled)))
            t0 = time.perf_counter()
            with torch.no_grad(), inductor_config.patch(freezing=True), quiet_build_log():
                fn = torch.compile(inductor_graph(self.eager, args), dynamic=False)
                fn(*args)  # the compile happens here
            self.compile_seconds[key] = time.perf_counter() - t0
            self._compiled[key] = fn
        return fn

    def forward(self, *args: Any) -> Any:
        with torch.no_grad():
            return self.compiled_for(args)(*args)


def build_inductor(eager: fx.GraphModule) -> InductorProgram:
    """An :class:`InductorProgram` over the int8 graph ``eager``; raises ``CompactnnError``
    when no C++ compiler exists (before any compile is tried)."""
    reason = compiler_missing()
    if reason is not None:
        raise CompactnnError(reason)
    return InductorProgram(eager)


__all__ = [
    "SHAPES_KEPT",
    "FloatLinear",
    "FrozenConv",
    "InductorProgram",
    "PoolU8",
    "build_inductor",
    "compiler_missing",
    "inductor_graph",
    "quiet_build_log",
]
