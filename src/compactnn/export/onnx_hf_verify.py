"""The read-back check of an ONNX export of a transformer (:mod:`compactnn.export.onnx_hf`).

The file runs in ONNX Runtime on the user's ``example`` and, for a token model, on a probe
batch of :data:`PROBE` seeded sequences of token ids (the CLI's example, 16 seeded tokens, is
too short to show what longer inputs do). Its main output is compared with the simulation's:
mean per-token cosine (the gate: ``min_cosine``), max abs difference, and for a W8A8 (QDQ)
file the share of activation codes that differ. The quantizer formula is the same on both
sides (torch's traced QDQ model equals the simulation bit for bit; both round half to even),
but ONNX Runtime computes norms, attention and softmax in another float order (last-bit
differences), which tips the activations lying that close to half a grid step onto the
neighbouring code; later grids carry those flips. Tiny byte-level Llama
``w8a8-smoothquant``, 16 x 128 held-out tokens: 0.088% of codes differ (at most 3 steps),
max logit difference 0.034 (3.1e-3 of max |logit| 11), perplexity 8.10715 against 8.10709.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.calib import main_output
from compactnn.core.dynact import DynamicActQuantizer
from compactnn.core.qlayers import QuantLinear
from compactnn.export.hf_check import mean_cosine

PROBE = (4, 128)  # sequences x tokens of the probe batch (tokens capped by the positions)
METADATA_KEY = "compactnn.verification"


@dataclasses.dataclass
class Verification:
    """What the read-back measured on ``tokens`` tokens (``what`` names the inputs)."""

    cosine: float
    max_diff: float
    max_ref: float
    tokens: int
    what: str
    codes_off: float | None = None  # share of activation codes on another step (W8A8)
    max_steps: int | None = None

    def line(self) -> str:
        """One line for the CLI and the file's metadata."""
        rel = self.max_diff / self.max_ref if self.max_ref else float("nan")
        text = (
            f"verified in ONNX Runtime on {self.tokens} tokens ({self.what}): mean cosine "
            f"{self.cosine:.7f}, max |diff| {self.max_diff:.2g} ({rel:.1e} of max |output| "
            f"{self.max_ref:.3g})"
        )
        if self.codes_off == 0:
            text += "; every activation code equal"
        elif self.codes_off is not None:
            text += (
                f"; {self.codes_off:.3%} of activation codes differ, by at most "
                f"{self.max_steps} step(s) (float order in ONNX Runtime tips values at half a step)"
            )
        return text


def probe_batch(qmodel: nn.Module, example: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """:data:`PROBE` seeded sequences of token ids with ``example``'s keys (a mask of ones,
    segment ids of zeros), or None: not a token model, another key, or the example is as long."""
    ids, config = example.get("input_ids"), getattr(qmodel, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not isinstance(vocab, int):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    n = min(PROBE[1], limit) if isinstance(limit, int) and limit > 0 else PROBE[1]
    if ids.numel() >= PROBE[0] * n:
        return None
    gen = torch.Generator().manual_seed(0)
    new = torch.randint(0, vocab, (PROBE[0], n), generator=gen, dtype=ids.dtype)
    batch = {"input_ids": new}
    for key, value in example.items():
        if key in ("attention_mask", "token_type_ids") and isinstance(value, torch.Tensor):
            fill = 1 if key == "attention_mask" else 0
            batch[key] = torch.full_like(new, fill, dtype=value.dtype)
        elif key != "input_ids":
            return None
    return batch


def _codes(aq: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x``'s codes on ``aq``'s grid (per-token for a dynamic quantizer)."""
    qt = aq.qtype
    if isinstance(aq, DynamicActQuantizer):
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        hi = x.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / (qt.qmax - qt.qmin)).clamp(min=1e-8)
        zero = torch.round(qt.qmin - lo / scale)
    else:
        scale, zero = aq.scale, aq.zero.round()
    return torch.clamp(torch.round(x / scale) + zero, qt.qmin, qt.qmax)


def _sim_inputs(qmodel: nn.Module, batch: dict) -> tuple[torch.Tensor, list]:
    """The simulation's main output and ``(quantizer, input)`` of each distinct activation
    grid it ran (layers reading one tensor on one grid, e.g. q/k/v, counted once)."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        x = args[0]
        for other, y in seen:
            same = y is x or (y.shape == x.shape and torch.equal(y, x))  # smoothed: a copy
            if same and (isinstance(mod, DynamicActQuantizer) or _same_grid(mod, other)):
                return
        seen.append((mod, x.detach()))

    quantizers = {m.input_quantizer for m in qmodel.modules() if isinstance(m, QuantLinear)} - {
        None
    }
    handles = [q.register_forward_hook(hook) for q in quantizers]
    try:
        with torch.no_grad():
            out = main_output(qmodel.eval()(**batch))
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _same_grid(a: nn.Module, b: nn.Module) -> bool:
    return type(a) is type(b) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def _session(data: bytes, kind: str, probes: bool) -> tuple[Any, list[str]]:
    """An ONNX Runtime session as :func:`~compactnn.export.onnx_hf.ort_runner` runs it, with
    the inputs of the activation grids as extra outputs (``probes``); and those names."""
    onnx, ort = require("onnx", "onnx"), require("onnxruntime", "onnx")
    names: list[str] = []
    if probes:
        proto = onnx.load_from_string(data)
        inits = {i.name for i in proto.graph.initializer}
        for node in proto.graph.node:
            act = node.op_type == "QuantizeLinear" and node.input[0] not in inits
            if (node.op_type == "ReduceMin" or act) and node.input[0] not in names:
                names.append(node.input[0])
        for name in names:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        data = proto.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    level = "ORT_ENABLE_BASIC" if kind == "qdq" else "ORT_ENABLE_ALL"
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]), names


def verify(qmodel: nn.Module, data: bytes, kind: str, example: dict) -> list[Verification]:
    """Run ``data`` (form ``kind``) on ``example`` and :func:`probe_batch`; one
    :class:`Verification` per batch run (the example's first)."""
    batches = [(example, "the example")]
    if (probe := probe_batch(qmodel, example)) is not None:
        shape = tuple(probe["input_ids"].shape)
        batches.append((probe, f"{shape[0]} seeded sequences of {shape[1]} token ids"))
    sess, names = _session(data, kind, probes=kind == "qdq")
    graph_inputs = {i.name for i in sess.get_inputs()}
    results = []
    for batch, what in batches:
        sim, grids = _sim_inputs(qmodel, batch)
        feed = {k: v.detach().cpu().numpy() for k, v in batch.items() if k in graph_inputs}
        outs = [torch.from_numpy(o) for o in sess.run(None, feed)]
        got = outs[0]
        ids = batch.get("input_ids")
        check = Verification(
            cosine=mean_cosine(sim, got),
            max_diff=float((got.float() - sim.float()).abs().max())
            if got.shape == sim.shape
            else float("nan"),
            max_ref=float(sim.abs().max()),
            tokens=ids.numel() if isinstance(ids, torch.Tensor) else 0,
            what=what,
        )
        if names and len(grids) == len(names):
            off, steps, total = 0, 0, 0
            for (aq, x), y in zip(grids, outs[1:], strict=True):
                if y.shape != x.shape:
                    break
                diff = (_codes(aq, y) - _codes(aq, x)).abs()
                off, total = off + int((diff > 0).sum()), total + diff.numel()
                steps = max(steps, int(diff.max()))
            else:
                check.codes_off, check.max_steps = off / max(total, 1), steps
        results.append(check)
    return results


def with_line(data: bytes, line: str) -> bytes:
    """``data`` with ``line`` in its metadata (:data:`METADATA_KEY`): the graph unchanged."""
    onnx = require("onnx", "onnx")
    proto = onnx.load_from_string(data)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, line
    return proto.SerializeToString()


def read_line(path: Any) -> str | None:
    """The verification line an export stored in the ONNX file at ``path``, else None."""
    onnx = require("onnx", "onnx")
    proto = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
