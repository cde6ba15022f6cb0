"""Does a fast MatMulNBits session keep the simulated model's outputs? (:func:`to_ort_nbits`)

``accuracy_level=4`` quantizes each block of activations to int8 before MLAS's VNNI dot
products: an extra rounding the simulated model does not have. ``accuracy_level=0`` computes
in float32 on the same dequantized weights, so it matches the simulation up to summation
order. What level 4 computes, measured on ONNX Runtime 1.32 (MLAS, AVX-512 VNNI, one
MatMulNBits of K=384, block 32, 64 and 128): each row's activations, per block of the
weights' ``block_size``, become ``round(a / s)`` with ``s = max|a| / 127`` (symmetric int8),
then ``sum(q_a * (q_w - z)) * s * s_w``: level 4 equals that simulation to a relative 3e-7,
and is 0.006 to 0.012 away from float activations. A layer whose simulation has that grid
(act ``granularity="group"``) runs at level 4 always (its node's name holds :data:`PINNED`).
:func:`drift` measures how far a session's output is from the simulated one and
:func:`drifted` says whether that is beyond what an exact (float32) form ever reaches.

Measured (MiniLM ``w4-g32-gptq``, 2 and 109 sentences; classifier logits and
``last_hidden_state``): level 0 relative max difference 7e-7 to 9e-7, smallest row cosine
above 1 - 1e-10; level 4 relative max difference 0.009 to 0.031, smallest row cosine 0.998 to
0.9994, and 3 of 109 classifier predictions flipped (84.40% against 87.16% top-1).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.calib import main_output
from compactnn.core.qlayers import ActQuantizer
from compactnn.errors import user_stacklevel
from compactnn.lowering.probes import rounded_run
from compactnn.lowering.verify import ROUNDING_DRAWS

# beyond what float32 compute on the same weights reaches (7e-7 .. 9e-7 measured), well below
# what int8 activations cost (0.009 .. 0.031 measured)
MAX_RELATIVE_DIFF = 1e-3
MIN_ROW_COSINE = 0.9999  # level 0: above 1 - 1e-10; level 4: 0.998 .. 0.9994


def _rows(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``out`` as rows to compare: ``(B, T, H)`` hidden states as one row per real token
    (``mask`` 1), anything else one row per batch item."""
    out = out.detach().double()
    if out.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(out.shape[:2]):
        return out.reshape(-1, out.shape[-1])[mask.reshape(-1).bool()]
    return out.reshape(out.shape[0], -1) if out.dim() > 1 else out.reshape(1, -1)


def _logit_rows(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``out``'s last dim as rows over all leading dims: ``(B, T, V)`` decoder logits become
    one row per token, only real ones (``mask`` 1) when ``mask`` is ``(B, T)``."""
    rows = out.detach().reshape(-1, out.shape[-1])
    if mask is not None and out.dim() > 2 and tuple(mask.shape) == tuple(out.shape[:-1]):
        return rows[mask.reshape(-1).bool()]
    return rows


def drift(
    got: torch.Tensor,
    ref: torch.Tensor,
    mask: torch.Tensor | None = None,
    logits: bool | None = None,
) -> dict[str, float | None]:
    """How far ``got`` (a fast session's output) is from ``ref`` (the simulated model's).

    Returns ``relative_max_diff`` (``max |got - ref| / max |ref|``), ``min_cosine`` (the
    smallest cosine over rows: tokens of hidden states, batch items otherwise) and
    ``argmax_agreement`` (share of rows with the same argmax when ``ref`` is logits: a
    classifier's ``(B, C)`` rows or a decoder's ``(B, T, V)`` tokens, real ones only under
    ``mask``; None for hidden states). ``logits`` None: 2-D outputs are logits.

    Example:
        >>> ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> drift(ref + 0.5 * torch.tensor([[0.0, 1.0], [0.0, 0.0]]), ref)["relative_max_diff"]
        0.25
    """
    a, b = _rows(got, mask), _rows(ref, mask)
    scale = b.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    agree = None
    if (got.dim() == 2 if logits is None else logits) and got.dim() >= 2:
        ga, gb = _logit_rows(got, mask), _logit_rows(ref, mask)
        agree = (ga.argmax(-1) == gb.argmax(-1)).double().mean().item()
    return {
        "relative_max_diff": ((a - b).abs().max() / scale).item(),
        "min_cosine": cos.min().item(),
        "argmax_agreement": agree,
    }


def drifted(measured: dict[str, float | None]) -> str | None:
    """Why ``measured`` (from :func:`drift`) is beyond an exact form, or None when it is not.

    Example:
        >>> drifted({"relative_max_diff": 0.03, "min_cosine": 0.998, "argmax_agreement": 1.0})
        'relative max difference 0.03 > 0.001, smallest row cosine 0.99800 < 0.9999'
        >>> drifted({"relative_max_diff": 8e-7, "min_cosine": 1.0, "argmax_agreement": 1.0})
    """
    why = []
    rel, cos, agree = (measured[k] for k in ("relative_max_diff", "min_cosine", "argmax_agreement"))
    if not rel <= MAX_RELATIVE_DIFF:  # NaN drifts too
        why.append(f"relative max difference {rel:.2g} > {MAX_RELATIVE_DIFF:g}")
    if not cos >= MIN_ROW_COSINE:
        why.append(f"smallest row cosine {cos:.5f} < {MIN_ROW_COSINE:g}")
    if agree is not None and agree < 1.0:
        why.append(f"argmax agrees on {agree:.0%} of rows")
    return ", ".join(why) or None


PROBE_FACTOR = 2.0  # a session within twice the simulation's own movement is explained


def rounding_probe(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    ref: torch.Tensor,
    logits: bool | None = None,
) -> dict:
    """How far the simulated ``model``'s own output (``ref``) moves when every activation
    quantizer's input is nudged by float rounding: deploy's float-rounding probe
    (:func:`compactnn.lowering.probes.rounded_run`, ``ROUNDING_ULPS`` ulps of random sign),
    the worst of its ``ROUNDING_DRAWS`` draws as a :func:`drift` dict.

    Another runtime computes LayerNorm, GELU and softmax with other roundings; where the
    simulation quantizes activations, a value on a rounding boundary then takes the next code
    and the flips compound through the blocks. Measured (MiniLM ``w4a8g-g32``, 64 sentences):
    the probe moves the simulation by 0.0096 (relative max; smallest row cosine 0.9994), and
    ``accuracy_level=4`` differs from it by 0.0082-0.011 (smallest row cosine 0.9992-0.9993);
    a weight-only simulation has no activation quantizer and does not move.
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    worst: dict = {}
    for seed in range(ROUNDING_DRAWS):
        with torch.no_grad():
            moved = main_output(rounded_run(model, quantizers, example, seed)).float()
        d = drift(moved, ref, example.get("attention_mask"), logits)
        worst = d if not worst else _worse(worst, d)
    return worst


def _is_logits(out: Any) -> bool:
    """Whether ``out``'s main output (:func:`main_output`) is logits: a Hugging Face output's
    or a dict's ``logits``, or a plain 2-D tensor (a classifier's)."""
    if isinstance(out, torch.Tensor):
        return out.dim() == 2
    value = getattr(out, "logits", None)
    if value is None and isinstance(out, Mapping):
        value = out.get("logits")
    if isinstance(value, torch.Tensor):
        return True
    first = out[0] if isinstance(out, (list, tuple)) and out else None
    return isinstance(first, torch.Tensor) and first.dim() == 2


def _worse(a: dict, b: dict) -> dict:
    agree = [x for x in (a["argmax_agreement"], b["argmax_agreement"]) if x is not None]
    return {
        "relative_max_diff": max(a["relative_max_diff"], b["relative_max_diff"]),
        "min_cosine": min(a["min_cosine"], b["min_cosine"]),
        "argmax_agreement": min(agree) if agree else None,
    }


def explained(measured: dict, probe: dict, factor: float = PROBE_FACTOR) -> bool:
    """Whether ``measured`` (a session against the simulation) stays within ``factor`` times
    the simulation's own movement under :func:`rounding_probe` (``probe``).

    Example:
        >>> probe = {"relative_max_diff": 0.009, "min_cosine": 0.9993, "argmax_agreement": None}
        >>> explained({"relative_max_diff": 0.011, "min_cosine": 0.9992,
        ...            "argmax_agreement": None}, probe)
        True
        >>> explained({"relative_max_diff": 0.011, "min_cosine": 0.9992,
        ...            "argmax_agreement": None}, {**probe, "relative_max_diff": 1e-6})
        False
    """
    rel, cos = measured["relative_max_diff"], measured["min_cosine"]
    ok = rel <= factor * probe["relative_max_diff"] and 1 - cos <= factor * (
        1 - probe["min_cosine"]
    )
    agree, floor = measured["argmax_agreement"], probe["argmax_agreement"]
    return ok and (agree is None or floor is None or agree >= floor)


# in the name of a MatMulNBits node whose layer's simulation is level 4's own (per-group int8
# activations): set_accuracy_level leaves it at level 4
PINNED = "_a8groups"


def pinned_nodes(path: str | os.PathLike) -> tuple[int, int]:
    """``(pinned, all)`` MatMulNBits nodes of the ``.onnx`` file ``path`` (:data:`PINNED`)."""
    onnx = require("onnx", "onnx")
    proto = onnx.load(str(path), load_external_data=False)
    names = [n.name for n in proto.graph.node if n.op_type == "MatMulNBits"]
    return sum(PINNED in n for n in names), len(names)


def checked_level(
    model: nn.Module, example: dict, fast: Any, path: Path, exact: Callable[[], Any]
) -> Any:
    """:func:`~compactnn.kernels.ort_nbits.to_ort_nbits`'s choice: ``fast`` (the session at
    ``path``, level 4) when its output on ``example`` stays within tolerance of the simulated
    ``model``'s (:func:`drifted`) or within :data:`PROBE_FACTOR` times the simulation's own
    movement under float rounding (:func:`rounding_probe`); else ``exact()``: the model
    written again at ``path`` at level 0 (:data:`PINNED` nodes stay at 4) and opened, with a
    warning. A model
    whose every node is pinned keeps level 4 (it has no other form), with a warning."""
    training = model.training
    mask = example.get("attention_mask")
    try:
        with torch.no_grad():
            out = model.eval()(**example)
        ref, logits = main_output(out).float(), _is_logits(out)
        measured = drift(fast(**example)[0], ref, mask, logits)
        check = {**measured, "accuracy_level": fast.accuracy_level, "drifted": drifted(measured)}
        fast.accuracy_check = check
        if check["drifted"] is None:
            return fast
        # a simulation that quantizes activations (a8g) moves as much under float rounding
        check["probe"] = probe = rounding_probe(model, example, ref, logits)
    finally:
        model.train(training)
    if explained(measured, probe):
        check["explained"] = True  # within the simulation's own rounding variation
        return fast
    pinned, total = pinned_nodes(path)
    if pinned == total:  # level 4 is every layer's own grid: nothing to fall back to
        warnings.warn(
            f"to_ort_nbits: the outputs differ from the simulated model on the example "
            f"({check['drifted']}) by more than {PROBE_FACTOR:g}x what float rounding at "
            f"each layer's input moves the simulation (relative max "
            f"{probe['relative_max_diff']:.2g}); every layer runs at accuracy_level=4, the "
            "grid its per-group activations simulate. Check its quality on your data.",
            stacklevel=user_stacklevel(),
        )
        return fast
    del fast
    out = exact()
    out.accuracy_level, out.accuracy_check = 0, check
    check["level_0"] = exact = drift(out(**example)[0], ref, mask, logits)
    still = drifted(exact)
    warnings.warn(
        f"to_ort_nbits: accuracy_level=4 (int8 activations) moved the outputs away from the "
        f"simulated model on the example ({check['drifted']}); running accuracy_level=0 "
        "(float32 compute) instead"
        + (
            f" (which differs too: {still}; float token tables stored in bfloat16 round them, "
            "bf16_tables=False keeps float32)"
            if still
            else ", which gives the simulated outputs"
        )
        + (f"; its {pinned} layers with per-group activations stay at level 4" if pinned else "")
        + ". Pass accuracy_level=4 to force the faster int8 form (1.3x at batch 1 on "
        "MiniLM, 33 tokens) after checking its quality on your data, or quantize "
        "activations like it does (a 'w4a8g-g32-gptq' recipe).",
        stacklevel=user_stacklevel(),
    )
    return out
