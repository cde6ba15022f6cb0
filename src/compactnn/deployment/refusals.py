"""What ``deploy`` refuses, and why: pure checks on its arguments and on the model.

Each check raises :class:`~compactnn.errors.CompactnnError` naming the bad input and what to
do instead (or returns that reason as text); none of them changes the model. A deployed
model is recognised by its class attribute ``is_deployed`` (``api.DeployedModel``), so this
module does not import the one that uses it.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import (
    batch_hint,
    call_model,
    check_example,
    expected_inputs,
    input_spec,
)
from compactnn.core.dynact import DynamicActQuantizer, per_token_misfits
from compactnn.core.qlayers import is_quant_layer
from compactnn.deployment import binary
from compactnn.engines.binary import BinaryBlock
from compactnn.errors import CompactnnError, first_line, name_list
from compactnn.lowering.graph import unsupported_reason
from compactnn.lowering.plan import RESIDUALS
from compactnn.lowering.verify import DEFAULT_TOLERANCE
from compactnn.measure.float_paths import is_plain_float
from compactnn.recipe import parse_short_name, resolve_recipe

BACKENDS = ("auto", "onednn", "onnxruntime", "inductor")

# pickle and torch.save of a deployed model (any backend) stop with this reason
NOT_PICKLABLE = (
    "a deployed model holds compiled kernels (oneDNN prepacked weights, an ONNX Runtime "
    "session or compiled code), which cannot be pickled (torch.save, pickle): save it with "
    "compactnn.save(deployed, path) and load it back with compactnn.load(path, model=...), "
    "which re-deploys and re-verifies it; for a second copy in memory, deploy the "
    "compressed model again (compactnn.deploy(deployed.source, example=...))."
)

# deploy(model) of a model with no quantized layer: what a Python caller passes instead
PLAIN_FLOAT = (
    "nothing to deploy: qmodel is a plain float model with no quantized layers (e.g. a "
    "channel-pruned one), which runs as it is: call it, or export it with torch.onnx.export. "
    "For int8 kernels, deploy what compactnn.compress returns for a recipe that quantizes, "
    "e.g. compactnn.deploy(compactnn.compress(model, 'w8a8', calib_data=x), example=x[:8])."
)
# the same refusal on the command line (`compactnn deploy` of a channel-pruned artifact)
PLAIN_FLOAT_CLI = (
    "nothing to deploy: this is a plain float model with no quantized layers (e.g. a "
    "channel-pruned artifact), which runs as it is. Time it on its fastest float "
    "runtime with `compactnn eval ARTIFACT --model MODEL --data FILE`, call it as it "
    "is in Python, or export it with torch.onnx.export; for int8 kernels, compress "
    "the float model with a recipe that also quantizes (channel pruning, then w8a8: "
    "docs/cli.md) and deploy that artifact."
)


def check_args(
    qmodel: Any,
    backend: str,
    example: Any,
    residual: str,
    unsupported: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> None:
    """Refuse arguments ``deploy`` cannot use, before any copy or tracing of ``qmodel``."""
    if not isinstance(qmodel, nn.Module):
        raise CompactnnError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}.")
    if backend not in BACKENDS:
        raise CompactnnError(f"backend={backend!r} is unknown; use one of {BACKENDS}.")
    if residual not in RESIDUALS:
        raise CompactnnError(f"residual={residual!r} is unknown; use one of {RESIDUALS}.")
    if unsupported not in ("float", "error"):
        raise CompactnnError(f"unsupported={unsupported!r}: use 'float' or 'error'.")
    check_tolerance(tolerance)
    if example is None:
        raise CompactnnError(
            "deploy verifies the integer model against the simulated one: pass example= a "
            "sample batch the model takes (e.g. a few calibration inputs)."
        )
    check_example(example)
    if getattr(qmodel, "is_deployed", False) is True:  # an api.DeployedModel
        raise CompactnnError(
            f"qmodel is already deployed (on {qmodel.backend}): call it as it is; to deploy "
            "again, e.g. on another backend, pass the compressed model it came from "
            "(deployed.source)."
        )
    if is_plain_float(qmodel):
        raise CompactnnError(PLAIN_FLOAT)
    if not any(is_quant_layer(m) for m in qmodel.modules()):
        raise CompactnnError(
            "nothing to deploy: the model has no quantized layers. Compress it with a recipe "
            "that quantizes (`compactnn compress MODEL --recipe w8a8 --data FILE`, or "
            "compactnn.compress(model, 'w8a8', calib_data=...)) and deploy the result."
        )
    if (reason := hf_w8a8_reason(qmodel) or per_token_reason(qmodel)) is not None:
        raise CompactnnError(reason)  # before any tracing
    try:
        with torch.no_grad():
            call_model(qmodel, example)
    except Exception as e:  # compress's hint for its calibration data (core.calib)
        raise CompactnnError(example_refusal(qmodel, example, e)) from e


def example_refusal(qmodel: nn.Module, example: Any, e: Exception) -> str:
    """Why ``qmodel`` does not run on ``example``: the torch error's first line and what the
    model takes (dtype, rank, channels of its first layer), as compress says of calib_data.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3))
        >>> example_refusal(m, torch.zeros(2, 3, 8, 8), RuntimeError("bad"))[-80:]
        "Expected input: float32 values of shape (N, C, H, W) with C=1 (first layer '0')."
    """
    hint = (
        batch_hint(qmodel, example)
        if isinstance(example, dict)
        else f"Expected input: {expected_inputs(qmodel, None, example)}."
    )
    return f"the model does not run on example= ({input_spec(example)}): {first_line(e)}. {hint}"


def check_tolerance(tolerance: Any) -> None:
    """Refuse a ``tolerance`` that is not a finite number of output steps >= 0."""
    ok = isinstance(tolerance, int | float) and not isinstance(tolerance, bool)
    if not ok or not math.isfinite(tolerance) or tolerance < 0:
        raise CompactnnError(
            f"tolerance={tolerance!r}: pass a finite number of output steps >= 0 (default "
            f"{DEFAULT_TOLERANCE:g})."
        )


def binary_kernels(sim: nn.Module) -> str:
    """The oneDNN backend's kernels for ``sim``'s binary blocks, for a hint: popcount
    computes +-1 dots, so blocks with ``{0, 1}`` activations (sibnn) run on int8 only."""
    blocks = [m for m in sim.modules() if isinstance(m, BinaryBlock)]
    levels = [getattr(getattr(m, "act", None), "levels", "pm1") for m in blocks]
    if "01" not in levels:
        return "int8 or popcount kernels"
    if all(lv == "01" for lv in levels):
        return "int8 kernels: popcount computes +-1 dots, not {0, 1} activations"
    return "int8 kernels; popcount for the +-1 blocks, not the {0, 1} ones"


def check_backend(backend: str, sim: nn.Module, example: Any) -> None:
    """Refuse what ``backend`` has no kernel or input form for (before building it)."""
    if backend not in ("onnxruntime", "inductor"):
        return
    blocks = binary.binary_block_names(sim)
    if blocks and backend == "onnxruntime":
        raise CompactnnError(
            f"ONNX Runtime has no kernel for binary blocks ({name_list(blocks, 3)}): "
            f"deploy them with backend='onednn' ({binary_kernels(sim)})."
        )
    if blocks:
        raise CompactnnError(
            f"backend='inductor' does not compile binary blocks ({name_list(blocks, 3)}): "
            f"deploy them with backend='onednn' ({binary_kernels(sim)})."
        )
    if backend == "inductor":
        return
    if isinstance(example, dict):  # deploy passes one that maps to forward as a tuple
        raise CompactnnError(
            f"ONNX Runtime feeds its inputs by position, and example= names {list(example)}, "
            "which are not the leading parameters of forward (or are keyword-only): pass "
            "example= as a tuple in forward's order, or deploy with backend='onednn'."
        )
    if not isinstance(example, torch.Tensor) and not all(
        isinstance(v, torch.Tensor) for v in example
    ):
        raise CompactnnError(
            "ONNX Runtime takes tensors as its inputs, and example= passes a dict or tuple "
            "as one argument: deploy with backend='onednn', or give forward the tensors "
            "themselves (positional or keyword arguments)."
        )


def require_int8_layers(sim: nn.Module) -> None:
    """Refuse a model none of whose quantized layers has an integer kernel."""
    if binary.binary_block_names(sim):
        return  # binary blocks run on integer kernels of their own
    reasons = {n: unsupported_reason(m) for n, m in sim.named_modules() if is_quant_layer(m)}
    if all(r is not None for r in reasons.values()):
        raise CompactnnError(no_integer_layers(sim, reasons))


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (never imports transformers)."""
    transformers = sys.modules.get("transformers")  # loaded whenever model is one of its models
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


# where each form of a Hugging Face transformer runs, since deploy cannot trace one
_TRACE = "deploy lowers traceable graphs (CNNs) and cannot trace the Hugging Face {name}"
_HF_RUNS = {
    "per-token": _TRACE + ": its W8A8 linear layers (per-token activations) run on int8 kernels "
    "with compactnn.to_kernels(q) (or compactnn.load(path, kernels=True)); ",
    "runtime": _TRACE + ": its layers with per-group (a8g) or per-tensor (a8d) dynamic "
    "activations run on ONNX Runtime's MatMulNBits / DynamicQuantizeMatMul with "
    "compactnn.to_ort_nbits(q, example); ",
    "static": _TRACE + "; its W8A8 layers quantize activations on static grids, which no int8 "
    "kernel of compactnn.to_kernels takes: compress with 'w8a8-smoothquant' (per-token "
    "activations) and run the result with compactnn.to_kernels(q); ",
    "weight-only": "deploy runs quantized activations on int8 kernels, and this weight-only "
    "{name} has none ({n} layers quantize weights only): run it on compactnn's low-bit kernels "
    "with compactnn.to_kernels(q) (or compactnn.load(path, kernels=True)), or on ONNX Runtime "
    "with compactnn.to_ort_nbits(q); ",
}
_MEASURE = "`compactnn eval {artifact} --model MODEL --data FILE` measures that form."


def hf_reason(kind: str, name: str, n: int = 0, artifact: str = "ARTIFACT") -> str:
    """Why deploy refuses a Hugging Face ``name`` whose quantized layers (``n``) are of
    ``kind`` (a key of ``_HF_RUNS``), and where they run instead."""
    return _HF_RUNS[kind].format(name=name, n=n) + _MEASURE.format(artifact=artifact)


def _acts_kind(acts: list[Any]) -> str | None:
    """The ``_HF_RUNS`` kind of a transformer's activation quantizers (None: weight-only)."""
    if not acts:
        return None
    if all(isinstance(a, DynamicActQuantizer) for a in acts):
        return "per-token"
    return "runtime" if all(getattr(a, "runtime_range", False) for a in acts) else "static"


def hf_w8a8_reason(qmodel: nn.Module) -> str | None:
    """Why deploy refuses a Hugging Face transformer with quantized activations (neither of
    its tracers takes their forward), and where its W8A8 layers run instead; None for
    anything else."""
    acts = [m.input_quantizer for m in qmodel.modules() if is_quant_layer(m)]
    kind = _acts_kind([a for a in acts if a is not None])
    if not is_hf(qmodel) or kind is None:
        return None
    return hf_reason(kind, type(qmodel).__name__)


def per_token_reason(qmodel: nn.Module) -> str | None:
    """Why deploy refuses a model (any, not only a transformer) with per-token dynamic
    activations (:class:`DynamicActQuantizer`, e.g. ``w8a8-smoothquant``), naming its layers
    and where they run instead; None when it has none.

    Example:
        >>> per_token_reason(nn.Sequential(nn.Linear(2, 2))) is None
        True
    """
    layers = {
        n: m
        for n, m in qmodel.named_modules()
        if is_quant_layer(m)
        and isinstance(getattr(m, "input_quantizer", None), DynamicActQuantizer)
    }
    if not layers:
        return None
    how = "quantize their inputs per token at run time (w8a8-smoothquant's dynamic activations"
    convs = per_token_misfits(layers)
    if convs:  # an artifact of a smoothquant that still took convolutions
        return (
            f"this model's convolutions {_quoted(convs)} {how}: one grid per row of pixels), "
            "which no int8 kernel runs: compress the float model again with 'w8a8' (static "
            "per-tensor activations) and deploy that."
        )
    return (
        f"this model's layers {_quoted(list(layers))} {how}), and deploy's int8 kernels take "
        "one calibrated scale and zero point: run these layers on int8 kernels with "
        "compactnn.to_kernels(q) (or compactnn.load(path, kernels=True)), or compress with "
        "'w8a8' (static per-tensor activations) to deploy."
    )


def _quoted(names: list[str]) -> str:
    """A few quoted layer names for a message, with their count when some are left out.

    Example:
        >>> _quoted(["a", "b", "c", "d"])
        "'a', 'b', 'c', ... (4 in all)"
    """
    more = f" ({len(names)} in all)" if len(names) > 3 else ""
    return name_list([repr(n) for n in names], 3) + more


def hf_artifact_reason(header: dict, artifact: str) -> str | None:
    """Why ``compactnn deploy`` cannot run the Hugging Face ``artifact``, read from its
    ``header`` alone, so it is said before --model or --data is asked for (the same reason
    the loaded model gets, with the command that writes its ONNX form); None for any other
    artifact (a CNN, or one without quantized layers).

    Example:
        >>> h = {"extra": {"hf": {"class": "BertModel"}}, "layers": {"fc": {"act_spec": None}}}
        >>> hf_artifact_reason(h, "out/q")[:60]
        'compactnn deploy out/q: deploy runs quantized activations on'
    """
    extra = header.get("extra") or {}
    layers = header.get("layers") or {}
    if not isinstance(extra.get("hf"), dict) or not layers:
        return None
    name = str(extra["hf"].get("class") or "transformer")
    per_token = set(extra.get("dynamic_act") or ())
    kinds = set()
    for layer, info in layers.items():
        spec = info.get("act_spec")
        if spec is None:
            continue
        runtime = spec.get("granularity") == "group" or spec.get("dynamic")
        kinds.add("per-token" if layer in per_token else "runtime" if runtime else "static")
    kind = "weight-only" if not kinds else kinds.pop() if len(kinds) == 1 else "static"
    reason = hf_reason(kind, name, len(layers), artifact).removesuffix(".")
    return (
        f"compactnn deploy {artifact}: {reason}; `compactnn export {artifact} --format onnx "
        "--out DIR` writes its verified ONNX Runtime form where it has one (`compactnn export "
        f"{artifact} --list` says), no --model or --data needed."
    )


def recipe_kind(recipe: Any) -> str | None:
    """The ``_HF_RUNS`` kind of the layers a resolved ``recipe`` quantizes, read from its
    steps' ``act`` specs (None when no step has one: a pruning-only recipe).

    Example:
        >>> recipe_kind(resolve_recipe("w4-g32")), recipe_kind(resolve_recipe("w8a8"))
        ('weight-only', 'static')
    """
    specs = [getattr(s.config, "act", "none") for s in recipe.steps]
    if not any(spec != "none" for spec in specs):
        return None
    acts = [
        (s, spec) for s, spec in zip(recipe.steps, specs, strict=True) if spec not in (None, "none")
    ]
    if not acts:
        return "weight-only"
    if any(getattr(s.config, "dynamic", False) is True for s, _ in acts):
        return "per-token"
    if all(spec.granularity == "group" or spec.dynamic for _, spec in acts):
        return "runtime"
    return "static"


def hf_model_reason(target: str, recipe_name: str, model: nn.Module) -> str:
    """Why ``compactnn deploy`` of a Hugging Face model with ``--recipe`` stops before it
    compresses anything: deploy cannot trace it whatever the recipe; where the compressed
    model runs instead, and the commands that get there."""
    name = type(model).__name__
    kind = recipe_kind(resolve_recipe(recipe_name))
    if kind is None:
        why = _TRACE.format(name=name) + " (and this recipe quantizes nothing)"
    else:
        why = _HF_RUNS[kind].format(name=name, n="all its quantized").removesuffix("; ")
    recipe_name = "w8a8-smoothquant" if kind == "static" else recipe_name  # as _HF_RUNS says
    return (
        f"compactnn deploy {target}: {why}. Compress it with `compactnn compress {target} "
        f"--recipe {recipe_name} --out DIR`; then `compactnn export DIR --list` names the "
        "runtimes that run it."
    )


def no_integer_layers(sim: nn.Module, kept: dict[str, str]) -> str:
    """Why deploy has nothing to run on integer kernels, and what to use instead: a
    weight-only transformer runs on the low-bit kernels (to_kernels, ONNX Runtime)."""
    quant = [m for m in sim.modules() if is_quant_layer(m)]
    if is_hf(sim) and quant and all(m.input_quantizer is None for m in quant):
        return hf_reason("weight-only", type(sim).__name__, len(quant))
    suggest = "'w8a8', 'w4a4'"
    recipe = (getattr(sim, "_compactnn", None) or {}).get("recipe")
    name = getattr(recipe, "name", "")
    # e.g. w5-inq: the same method; w4-g32(-gptq): per channel (int8 kernels take one scale
    # per output channel, never per group), so the group part is dropped
    form = re.fullmatch(r"w(\d+)(a\d+)?(?:-g\d+)?(?:-([a-z][\w-]*))?", name)
    if form and (form[2] is None or "-g" in name):
        same = f"w{form[1]}a8" + (f"-{form[3]}" if form[3] else "")
        why = "8-bit activations" + (", per-channel weights" if "-g" in name else "")
        try:
            parse_short_name(same)  # only a recipe that exists
            suggest = f"'{same}' ({name} with {why})"
        except CompactnnError:
            pass
    acts = any(getattr(m, "input_quantizer", None) is not None for m in sim.modules())
    lead = (
        "compress with a recipe whose layers int8 kernels take"
        if acts  # activations are quantized already: the reasons are elsewhere
        else "compress with a recipe that quantizes activations"
    )
    return (
        f"deploy found no layer it can run on integer kernels: {lead} (e.g. {suggest}); "
        f"kept in float: {listing(kept)}"
    )


def handle_unsupported(kept: dict[str, str], unsupported: str) -> None:
    """With ``unsupported="error"``, refuse the layers kept in float (name -> reason)."""
    if not kept:
        return
    if unsupported == "error":
        names = ", ".join(repr(n) for n in kept)
        raise CompactnnError(
            f"deploy cannot run these layers on int8 kernels: {listing(kept)}. Exclude them "
            f"from quantization with the recipe's ignore list (Targets(ignore=[{names}])) or "
            "pass unsupported='float' to keep them simulated in float."
        )
    # unsupported="float": deploy warns about the chosen backend's kept layers only


def failure_reason(e: Exception) -> str:
    """Why a backend could not deploy: a refusal's own message; any other error (a fault of
    compactnn's, not of the input) by its type and the first line of its message (torch's
    exporter errors go on with a dump of the whole graph), to report with the model."""
    if isinstance(e, CompactnnError):
        return str(e)
    return (
        f"{type(e).__name__}: {first_line(e)} (an internal error: please report it with the "
        "model; "
        "another backend may run it)"
    )


def listing(kept: dict[str, str]) -> str:
    """Layers grouped by reason, a few names each: ``"12 layers: <reason> (a, b, c, ...)"``."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in kept.items():
        by_reason.setdefault(reason, []).append(name)
    parts = [
        f"{names[0]} ({reason})"
        if len(names) == 1
        else f"{len(names)} layers: {reason} ({name_list(names, 3)})"
        for reason, names in by_reason.items()
    ]
    return "; ".join(parts) or "none"
