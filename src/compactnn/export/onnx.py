"""ONNX export of quantized models in QDQ form, verified with ONNX Runtime.

Every quantized layer becomes ``QuantizeLinear -> DequantizeLinear`` on its input (the
simulation's activation quantizer) and ``DequantizeLinear`` of its integer weight codes,
stored as they are (int8/uint8 initializers, per-channel scales and zero points), feeding
the float ``Conv`` / ``Gemm``, with the bias of a layer ONNX Runtime fuses into an integer
kernel stored as int32 codes on the accumulator grid (:func:`int32_bias_codes`, what integer
kernels add). That is the
simulation written in ONNX; ONNX Runtime's graph optimizer fuses such patterns into integer
kernels where it can, and :func:`verify_qdq` checks both steps. Layers whose activation
grid has no ONNX QuantizeLinear type (below 8 bits) spell the same rounding with
``Div/Round/Clip``; per-group weights are stored dequantized (float) and listed;
codebook weights (ternary, TTQ, powers of two) are one or two int8 terms, a second one
as a second ``Conv`` / ``Gemm`` added to the first, and padding modes / uneven ``"same"``
an explicit ``Pad`` (:mod:`compactnn.export.onnx_forms`). A grid
after a flatten/reshape is applied before it as well (same numbers), so a pool before a
classifier fuses to ``QLinearGlobalAveragePool``; ``onnx_graph.fold_float_outputs``
stores the weights of the layers ONNX Runtime runs in float dequantized for the deployed
session. The graph edits
after the export live in :mod:`compactnn.export.onnx_graph`.
"""

from __future__ import annotations

import copy
import io
import os
import re
import warnings
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.calib import call_model, check_example, expected_inputs, input_spec
from compactnn.core.modules import set_module
from compactnn.core.onnx_trace import exporting
from compactnn.core.qlayers import QuantConv1d, QuantConv2d, QuantLinear, is_quant_layer
from compactnn.engines.binary import BinaryBlock
from compactnn.errors import CompactnnError, first_line, name_list, user_stacklevel
from compactnn.export.onnx_file import check_onnx_path, warn_if_collapsed, write_onnx
from compactnn.export.onnx_forms import (
    codebook_terms,
    conv_pads,
    dequantized,
    float_layers_warning,
)
from compactnn.export.onnx_graph import (
    fold_float_outputs,
    int32_bias_layers,
    quantize_before_moves,
    store_bias_codes,
    store_codes,
)
from compactnn.export.onnx_io import Keywords, OnnxIO, onnx_io
from compactnn.export.onnx_values import check_value_branches, show_notes, tracer_notes
from compactnn.export.ort import ort_callable
from compactnn.lowering.graph import FLOAT, is_residual_quantizer, trace
from compactnn.lowering.plan import build_plan
from compactnn.lowering.probes import explained
from compactnn.lowering.verify import (
    DEFAULT_TOLERANCE,
    Verification,
    compare,
    enforce,
)

onnx = require("onnx", "onnx")

OPSET = 17


EIGHT_BIT = ((0, 255), (-128, 127))  # activation grids with an ONNX QuantizeLinear type
INT32_MAX = 2**31 - 1


def int32_bias_codes(
    bias: torch.Tensor, x_scale: float, w_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``bias`` on the int32 accumulator grid of an int8 layer: codes and per-row scale.

    An integer convolution adds its bias to the int32 accumulator of ``x_codes * w_codes``,
    whose step is ``x_scale * w_scale`` (per output row). ONNX Runtime's ``QLinearConv`` /
    ``QGemm`` take the bias that way only, and its graph optimizer rounds a float bias onto
    that grid itself (``WeightBiasQuantization``) before fusing; writing the rounding here
    makes it part of the file and of the reference it is verified against. None when a code
    would not fit int32 (or a scale is zero): the bias then stays float.

    Example:
        >>> w_scale = torch.tensor([0.1, 0.3])
        >>> codes, scale = int32_bias_codes(torch.tensor([0.1, -0.2]), 0.5, w_scale)
        >>> codes.tolist(), [round(v, 4) for v in (codes * scale).tolist()]
        ([2, -1], [0.1, -0.15])
    """
    scale = torch.tensor(x_scale, dtype=torch.float32) * w_scale.detach().float()
    if not bool((scale != 0).all()):  # negative: a codebook row kept at -128 (onnx_forms)
        return None
    codes = torch.round(bias.double() / scale.double())
    if not bool(torch.isfinite(codes).all()) or float(codes.abs().max()) > INT32_MAX:
        return None
    return codes.to(torch.int32), scale


class _QDQLayer(nn.Module):
    """A quantized layer in QDQ form: fake-quant ops that the exporter maps to Q/DQ pairs."""

    def __init__(self, layer: nn.Module, int32_bias: bool = True) -> None:
        super().__init__()
        self.kind = type(layer)
        self.conv_args = {}
        self.pad: tuple[list[int], str] | None = None  # F.pad before a padding=0 conv
        if not isinstance(layer, QuantLinear):
            padding, self.pad = conv_pads(layer)
            self.conv_args = dict(
                stride=layer.stride, padding=padding, dilation=layer.dilation,
                groups=layer.groups,
            )  # fmt: skip
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        # codebook weights (ternary, TTQ's two scales, powers of two) as one or two int8
        # terms with per-channel scales (lowering.graph.weight_terms); float when they have none
        codebook = getattr(layer, "weight_levels", None) is not None
        terms = codebook_terms(layer) if codebook else None
        self.per_channel = layer.weight_spec.granularity != "group" and (
            not codebook or terms is not None
        )
        rows = layer.weight.shape[0]
        scale, zero = layer.weight_scale, layer.weight_zero  # (rows or 1, groups)
        if not self.per_channel:  # stored float: the (rows, groups) grid is not one per row
            scale, zero = torch.ones(1), torch.zeros(1)
        signed = layer.weight_spec.qtype.signed
        self.w_range = (-128, 127) if signed else (0, 255)
        self.codes = layer.weight_codes.clone()
        self.weight2 = None  # a codebook's second term, added by a second conv / linear
        if terms is not None:
            (self.codes, scale), zero, self.w_range = terms[0], torch.zeros(1), (-128, 127)
            self.weight.data = dequantized(*terms[0])
            if len(terms) == 2:
                self.codes2 = terms[1][0]
                self.weight2 = nn.Parameter(dequantized(*terms[1]), requires_grad=False)
                self.register_buffer("w_scale2", terms[1][1])
        self.register_buffer("w_scale", scale.reshape(-1).expand(rows).clone())
        zero = zero.reshape(-1).expand(rows).round().to(torch.int32).clone()
        self.register_buffer("w_zero", zero)
        aq = layer.input_quantizer
        self.act = None
        if aq is not None and aq.enabled and aq.calibrated:
            per_token = getattr(aq, "is_per_token", False)
            if getattr(aq, "runtime_range", False) or per_token:
                how = "per token and group" if aq.is_group else "per token"
                how = how if per_token or aq.is_group else "with one range per tensor"
                raise CompactnnError(
                    f"{type(layer).__name__} quantizes its input {how} at run time: "
                    "QuantizeLinear takes one calibrated scale and zero point; run it with "
                    "compactnn.to_kernels(q), export the model as a Hugging Face transformer "
                    "(MatMulNBits / DynamicQuantizeMatMul), or compress with calibrated "
                    "per-tensor activations (e.g. w8a8)."
                )
            if not aq.is_uniform:
                raise CompactnnError(
                    f"{type(layer).__name__} has a non-uniform input grid (learned levels, e.g. "
                    "LQ-Nets): ONNX QuantizeLinear takes one scale and zero point; export the "
                    "model without quantized activations or keep it in compactnn."
                )
            self.act = (float(aq.scale), int(aq.zero.round()), aq.qtype.qmin, aq.qtype.qmax)
        self.bias_codes: torch.Tensor | None = None  # int32 bias on the accumulator grid
        self.bias_scale: torch.Tensor | None = None
        one_term = self.weight2 is None  # two terms: their sum is not one integer kernel's
        if (
            int32_bias
            and self.bias is not None
            and self.per_channel
            and self._eight_bit()
            and one_term
        ):
            grid = int32_bias_codes(self.bias.detach(), self.act[0], self.w_scale)
            if grid is not None:
                self.float_bias = self.bias.detach().clone()  # the simulation's
                self.bias_codes, self.bias_scale = grid
                # what DequantizeLinear(int32 codes, scale) gives ONNX Runtime, in float32
                self.bias.data = self.bias_codes.float() * self.bias_scale

    def _eight_bit(self) -> bool:
        return self.act is not None and (self.act[2], self.act[3]) in EIGHT_BIT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:  # before Q/DQ (same codes), so DQ -> Conv still fuses
            x = nn.functional.pad(x, self.pad[0], mode=self.pad[1])
        if self.act is not None:
            scale, zero, qmin, qmax = self.act
            # a float weight after a DequantizeLinear is one ONNX Runtime re-quantizes to
            # per-tensor int8 (WeightBiasQuantization): the float-op form keeps it float
            if (qmin, qmax) in EIGHT_BIT and self.per_channel:
                x = torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)
            else:  # no ONNX type for this grid: the same rounding in float ops
                x = (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale
        w = self.weight
        if self.per_channel:
            w = torch.fake_quantize_per_channel_affine(
                w, self.w_scale, self.w_zero, 0, *self.w_range
            )
        y = self._op(x, w, self.bias)
        if self.weight2 is not None:
            w2 = torch.fake_quantize_per_channel_affine(
                self.weight2, self.w_scale2, torch.zeros_like(self.w_zero), 0, -128, 127
            )
            y = y + self._op(x, w2, None)
        return y

    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind is QuantLinear:
            return nn.functional.linear(x, w, bias)
        conv = nn.functional.conv2d if self.kind is QuantConv2d else nn.functional.conv1d
        return conv(x, w, bias, **self.conv_args)


class _QDQAct(nn.Module):
    """A standalone 8-bit activation quantizer (``quantize_residuals``) as a Q/DQ pair."""

    def __init__(self, aq: nn.Module) -> None:
        super().__init__()
        self.grid = (float(aq.scale), int(aq.zero.round()), aq.qtype.qmin, aq.qtype.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, *self.grid)


def qdq_module(
    qmodel: nn.Module, int32_biases: bool | Collection[str] = True, example: Any = None
) -> tuple[nn.Module, dict[str, _QDQLayer], dict[str, str]]:
    """A copy of ``qmodel`` with every quantized layer in QDQ form; also the kept-float list.

    With ``int32_biases`` True (or the layer's name in it), a layer with an 8-bit input grid
    and integer weights has its bias rounded onto the int32 accumulator grid
    (:func:`int32_bias_codes`), as the integer kernels that run it need; otherwise the bias
    stays the simulation's.

    When the model traces with ``torch.fx``, each layer output that every consumer quantizes
    on the same grid (see :mod:`compactnn.lowering.plan`) gets that Q/DQ pair right after it:
    the same numbers (quantizing twice on one grid is idempotent), and it lets ONNX Runtime
    fuse ``DQ -> Conv -> Q`` into its integer kernels. ``forward``'s parameters with a default
    that ``example`` leaves unset keep it (:func:`~compactnn.lowering.graph.trace`).
    """
    blocks = [n for n, m in qmodel.named_modules() if isinstance(m, BinaryBlock)]
    if blocks:
        raise CompactnnError(
            f"ONNX export: binary blocks ({name_list(blocks, 3)}) have no ONNX form (binary "
            f"weights and 1-bit activations need compactnn's own kernels): {BINARY_SHIP}"
        )
    model = copy.deepcopy(qmodel).eval()
    try:
        gm = trace(model, example)
    except CompactnnError:
        gm = None
    root = model if gm is None else gm
    layers, kept = {}, {}
    for name, m in list(root.named_modules()):
        if not is_quant_layer(m):
            continue
        if not isinstance(m, (QuantConv2d, QuantConv1d, QuantLinear)):
            raise CompactnnError(f"ONNX export: unknown quantized layer {name!r}.")
        q = _QDQLayer(
            m, int32_biases is True or (int32_biases is not False and name in int32_biases)
        )
        if not q.per_channel:
            kept[name] = (
                "per-group weights: stored dequantized (float) in ONNX"
                if m.weight_spec.granularity == "group"
                else "codebook weights (ternary / powers of two, no single integer grid): "
                "stored dequantized (float) in ONNX"
            )
        layers[name] = q
    for name, m in list(root.named_modules()):
        if is_residual_quantizer(m) and not any(name.startswith(n + ".") for n in layers):
            set_module(root, name, _QDQAct(m))
    if gm is not None:
        _quantize_outputs(gm)
    for name, q in layers.items():
        set_module(root, name, q)
    return _Wrapped(root if gm is None else gm), layers, kept


class _Wrapped(nn.Module):
    """Hides a GraphModule's ``.graph`` (or a model's own attribute of that name) from the
    TorchScript exporter, which reads the top module's ``.graph`` as its own."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.inner = gm

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def _quantize_outputs(gm: torch.fx.GraphModule) -> None:
    """Insert the consumers' Q/DQ after each fused layer group whose output has one grid."""
    plan = build_plan(gm, "exact")
    for last, _group in plan.groups.items():
        form = plan.form[last]
        if form == FLOAT:
            continue
        with gm.graph.inserting_after(last):
            fq = gm.graph.call_function(
                torch.fake_quantize_per_tensor_affine, (last, form[0], form[1], 0, 255)
            )
        last.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)
    gm.recompile()


def _export_failure(qmodel: nn.Module, example: Any, exc: Exception) -> CompactnnError:
    """One line for a failed ``torch.onnx.export``: the example when the model does not run
    on it, else the operator (or the first line of the error) the exporter stopped at."""
    try:
        with torch.no_grad():
            call_model(qmodel, example)
    except Exception as e:  # the example, not the exporter
        return CompactnnError(
            f"ONNX export: the model does not run on example= ({input_spec(example)}): "
            f"{first_line(e)}. Pass {expected_inputs(qmodel, None, example)}."
        )
    op = re.search(r"operator '([^']+)'", str(exc))
    if op is not None:
        return CompactnnError(
            f"ONNX export: torch.onnx has no ONNX form (opset {OPSET}) for the operator "
            f"{op.group(1)!r} in this model: deploy it with backend='onednn', or replace the "
            "module that calls it."
        )
    return CompactnnError(
        f"ONNX export: torch.onnx failed ({type(exc).__name__}: {first_line(exc)}): deploy "
        "the model with backend='onednn'."
    )


def _export(model: nn.Module, spec: OnnxIO, args: tuple) -> bytes:
    """``torch.onnx.export`` of ``model`` traced on ``args``, named as ``spec`` says."""
    traced = Keywords(model, spec.inputs) if spec.keywords else model
    buf = io.BytesIO()
    with exporting():
        torch.onnx.export(
            traced, args, buf, dynamo=False, opset_version=OPSET, input_names=spec.inputs,
            output_names=spec.outputs, dynamic_axes=spec.axes, do_constant_folding=True,
        )  # fmt: skip
    return buf.getvalue()


def to_onnx_bytes(
    qmodel: nn.Module, example: Any, *, int32_heads: bool = False
) -> tuple[bytes, dict[str, str]]:
    """Serialized QDQ ONNX model of ``qmodel`` (batch dimension dynamic) and kept layers.

    ``int32_heads``: also store the bias of a ``Gemm`` whose output stays float (a classifier
    head) as int32 codes, so ONNX Runtime runs it as ``QGemm`` on the int8 codes (what
    :func:`export_onnx` writes; ``onnx_graph.store_bias_codes``).

    Exported under :func:`exporting` (``nn.MultiheadAttention`` as the ops ONNX has, nothing
    printed), with the names of :mod:`compactnn.export.onnx_io` (a dict example's keys are
    passed as keywords). A failure of the exporter raises ``CompactnnError``: the operator
    it has no ONNX form for, or the example the model does not run on; so does a graph that
    depends on the input's values (:mod:`compactnn.export.onnx_values`).
    """
    model, layers, kept = qdq_module(qmodel, example=example)
    try:
        spec = onnx_io(model, example, qmodel)  # runs the model on the example once
        with tracer_notes() as notes:
            data = _export(model, spec, spec.args)
    except CompactnnError:
        raise
    except Exception as e:
        raise _export_failure(qmodel, example, e) from e
    names = spec.inputs if spec.keywords else None
    check_value_branches(lambda a: _export(model, spec, a), spec.args, data, notes, qmodel, names)
    show_notes(notes)  # shape checks: the warnings the tracer gave, as before
    proto = onnx.load_from_string(data)
    store_codes(proto, model, layers)
    store_bias_codes(proto, model, layers, gemms=int32_heads)
    quantize_before_moves(proto)
    return proto.SerializeToString(), kept


def verify_qdq(
    qmodel: nn.Module,
    data: bytes,
    run: Callable[..., Any],
    example: Any,
    what: str,
    tolerance: float,
    *,
    against: str = "simulation",
) -> Verification:
    """Check ``run`` (an ONNX Runtime session of ``data``, from :func:`to_onnx_bytes`)
    against ``qmodel``; how far the file's int32 biases (what integer kernels add) move the
    output from the simulation is measured too (``bias_rounding_steps``), as information.

    ``against="simulation"`` (the ``onnxruntime`` backend of ``deploy``, held to the same
    standard as the ``onednn`` one): ``run`` against ``qmodel`` itself, within ``tolerance``
    output steps, int32 bias rounding included.

    ``against="file"`` (``export_onnx``: a file whose integer kernels need int32 biases,
    with no other form to offer): two checks, each within ``tolerance``: the QDQ form with
    the simulation's float biases against ``qmodel`` (the export reproduces the
    simulation), then ``run`` against the QDQ form with int32 biases (the runtime
    reproduces the file); the first that fails is returned, else the second. The bias
    rounding is not refused there: a network that amplifies one-code flips (ternary,
    4-bit) moves several steps while its accuracy stays (compactnn eval measures the
    delivered model).

    A failed check comes with :func:`~compactnn.lowering.probes.explained`; nothing is
    raised (see :func:`~compactnn.lowering.verify.enforce`).
    """
    if against not in ("simulation", "file"):
        raise CompactnnError(f"against={against!r} is unknown; use 'simulation' or 'file'.")
    was_training = qmodel.training
    qmodel.eval()
    try:
        return _verify_qdq(qmodel, data, run, example, what, tolerance, against)
    finally:
        qmodel.train(was_training)  # the caller's model keeps its mode


def _verify_qdq(qmodel, data, run, example, what, tolerance, against) -> Verification:
    exact = qdq_module(qmodel, int32_bias_layers(data), example)[0]
    moved = compare(qmodel, exact, example, "int32 biases", float("inf")).max_diff_steps
    if against == "simulation":
        result = explained(compare(qmodel, run, example, what, tolerance), qmodel, example)
        return replace(result, bias_rounding_steps=moved)
    float_bias = qdq_module(qmodel, int32_biases=False, example=example)[0]
    form = compare(qmodel, float_bias, example, f"{what} (QDQ form)", tolerance)
    if not form.passed:
        return explained(form, qmodel, example)
    result = explained(compare(exact, run, example, what, tolerance), exact, example)
    return replace(result, bias_rounding_steps=moved, reference="its QDQ file")


def ort_session(qmodel: nn.Module, example: Any) -> tuple[Callable[..., Any], dict[str, str]]:
    """An ONNX Runtime callable running the QDQ export of ``qmodel`` (used by ``deploy``)."""
    data, kept = to_onnx_bytes(qmodel, example)
    return ort_callable(fold_float_outputs(data)), kept


# How to ship binary blocks instead; the command line says it in its own words (deploy.py).
BINARY_SHIP = (
    "deploy the model with compactnn.deploy(model, example=..., backend='onednn') (int8; "
    "popcount for +-1 only) and ship it with compactnn.deployment.save_deployed."
)
BINARY_SHIP_CLI = (
    "deploy it without --onnx and ship it with --save DIR (oneDNN int8; popcount for +-1 "
    "only), which compactnn.deployment.load_deployed loads."
)


def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example: Any,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
) -> Verification:
    """Write ``qmodel`` as a QDQ ONNX file and verify it with ONNX Runtime.

    Args:
        qmodel: a compressed model (any recipe; int8 form needs 8-bit per-channel layers).
        path: the ``.onnx`` file to write (atomically, only after the check passes; missing
            parent folders are created).
        example: a sample batch; the ONNX model and the simulated model run on it.
        tolerance: largest allowed difference, in steps of the output scale.
        force: replace an earlier ONNX export at ``path``; any other file there is refused,
            ``force`` or not, as an existing one is without it (before any work;
            :func:`~compactnn.export.onnx_file.check_onnx_path`).

    Returns:
        The verification; raises ``CompactnnError`` past ``tolerance`` or when one model
        gives NaN/Inf where the other does not (see :mod:`compactnn.lowering.verify`), and
        when ``path`` is a folder or an existing file without ``force``. Quantized layers
        the file stores as float32 weights (per-group scales, a codebook with no int8 form)
        are named in a warning with their share of the file size; a model whose output is
        the same for every sample while its float form's varies gets deploy's collapse
        warning (``CollapseWarning``): agreeing with it proves nothing.

    Example:
        >>> export_onnx(qmodel, "model.onnx", example=images[:8])  # doctest: +SKIP
    """
    if example is None:
        raise CompactnnError("export_onnx verifies the file: pass example= a sample batch.")
    check_example(example)  # non-empty and finite, so the NaN-aware comparison means something
    check_onnx_path(path, force)  # before the export
    data, kept = to_onnx_bytes(qmodel, example, int32_heads=True)
    result = enforce(
        verify_qdq(
            qmodel, data, ort_callable(data), example, "onnx export", tolerance, against="file"
        )
    )
    write_onnx(path, data)
    warn_if_collapsed(qmodel, example, result.output_step)  # a check against it proves nothing
    if (line := float_layers_warning(qmodel, kept, len(data), os.path.basename(path))) is not None:
        warnings.warn(line, stacklevel=user_stacklevel())
    return result
