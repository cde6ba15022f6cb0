"""Measurements shared by ``compactnn eval``, the demo and the benchmarks: size on disk,
theoretical size, per-layer formats, and output fidelity against the float model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model, main_output
from compactnn.core.modules import weight_layers
from compactnn.core.qlayers import is_quant_layer
from compactnn.export.size import artifact_size, theoretical_size


def artifact_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an artifact directory (every file in it, as ``os.stat`` reports)."""
    return int(artifact_size(path))


def theoretical_bytes(model: nn.Module) -> int:
    """Bytes implied by the recipe: packed codes + scale/zero storage + tensors kept as is."""
    return int(theoretical_size(model))


def float_artifact_bytes(model: nn.Module) -> int:
    """Bytes on disk of ``model`` saved as a compactnn artifact in a temporary directory."""
    import compactnn

    with tempfile.TemporaryDirectory(prefix="compactnn-size-") as tmp:
        compactnn.save(model, Path(tmp) / "a")
        return artifact_bytes(Path(tmp) / "a")


def layer_formats(model: nn.Module) -> dict[str, str]:
    """Each weight layer's storage: a quantized format (``uint4-asym-group32``) or its dtype."""
    out = {}
    for name, m in model.named_modules():
        if is_quant_layer(m):
            act = m.input_quantizer
            out[name] = m.format + (f" / act {act.qtype.name}" if act is not None else "")
        elif name in _float_weight_layers(model):
            out[name] = str(m.weight.dtype).removeprefix("torch.")
    return out


def _float_weight_layers(model: nn.Module) -> set[str]:
    # a quantized layer owns a child (its input quantizer), so weight_layers misses it
    return set(weight_layers(model))


def first_rows(batch: Any, n: int = 1) -> Any:
    """The first ``n`` samples of a batch (tensor, tuple or dict of tensors).

    A tokenized batch (a dict with ``attention_mask``) also loses the trailing columns that
    are padding in all kept rows, as a tokenizer would pad those ``n`` texts.
    """
    if isinstance(batch, dict):
        rows = {k: v[:n] for k, v in batch.items()}
        mask = rows.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.any():
            keep = int(mask.nonzero()[:, 1].max()) + 1  # last real token column
            rows = {
                k: v[:, :keep] if isinstance(v, torch.Tensor) and v.shape == mask.shape else v
                for k, v in rows.items()
            }
        return rows
    if isinstance(batch, tuple):
        return tuple(v[:n] for v in batch)
    return batch[:n]


@torch.no_grad()
def output_fidelity(reference: nn.Module, model: nn.Module, batches: list) -> dict[str, float]:
    """Mean cosine (per sample, flattened) and SQNR in dB of ``model``'s outputs vs
    ``reference``'s on ``batches``."""
    cos, signal, noise = [], 0.0, 0.0
    for batch in batches:
        ref = main_output(call_model(reference, batch, "first")).float()
        out = main_output(call_model(model, batch, "first")).float()
        r, o = ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)  # (N, D)
        cos.append(torch.nn.functional.cosine_similarity(r, o, dim=1))
        signal += float((r**2).sum())
        noise += float(((r - o) ** 2).sum())
    sqnr = float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(signal / noise)).item()
    return {"cosine": float(torch.cat(cos).mean()), "sqnr_db": sqnr}
