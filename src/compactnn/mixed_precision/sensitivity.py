"""Per-layer sensitivity: how much the model's output moves when one layer is quantized.

Two measures, both on calibration data only (never held-out data):

* ``measured``: the relative output error when only layer ``l`` is rounded to format ``f``
  (min-max round-to-nearest), ``s[l, f] = sum_b ||y_b(W_l -> Q_f(W_l)) - y_b||^2 / sum_b
  ||y_b||^2``; one forward pass per (layer, format).
* ``hessian`` (HAWQ-V2): ``s[l, f] = 1/2 * Tr(H_l) / n_l * ||Q_f(W_l) - W_l||^2``, the
  second-order change of the same loss, with ``Tr(H_l)`` from Hutchinson's estimator
  (:func:`compactnn.core.hessian.hutchinson_trace`) and ``n_l`` the layer's weight count.

Results are cached per (model, data, format, measure) in a JSON file the caller names (the
search's output folder): the key hashes the model's state, the calibration batches and the
format, so a changed model or data set never reads a stale entry.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compactnn.core.calib import call_model, detect_call_mode, main_output
from compactnn.core.digest import tensor_digest
from compactnn.core.fold import fold_batchnorm
from compactnn.core.hessian import hutchinson_trace
from compactnn.errors import CompactnnError
from compactnn.export.fs import atomic_write_text
from compactnn.mixed_precision.formats import Format, pruned_rows, rtn_weight

CACHE_VERSION = 1
MEASURES = ("measured", "hessian")


def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [batch[k] for k in sorted(batch) if isinstance(batch[k], torch.Tensor)]
    return [t for t in batch if isinstance(t, torch.Tensor)]


def data_digests(model: nn.Module, batches: list) -> tuple[str, str]:
    """Digests of the model's state and of the calibration batches."""
    model_digest = tensor_digest(list(model.state_dict().values()))
    return model_digest, tensor_digest([t for b in batches for t in _batch_tensors(b)])


def cache_key(digests: tuple[str, str], fmt: Format, measure: str) -> str:
    """Key of one (model, data, format, measure) entry."""
    text = json.dumps([CACHE_VERSION, *digests, fmt.name, measure])
    return hashlib.sha256(text.encode()).hexdigest()


class SensitivityCache:
    """A JSON file of ``key -> {layer: score}``; ``path=None`` keeps nothing."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, float]] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}  # a damaged cache is recomputed, never trusted
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
                self.entries = data.get("entries", {})

    def get(self, key: str, names: list[str]) -> list[float] | None:
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or not all(n in entry for n in names):
            return None
        return [float(entry[n]) for n in names]

    def put(self, key: str, names: list[str], values: list[float]) -> None:
        self.entries[key] = dict(zip(names, map(float, values), strict=True))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"version": CACHE_VERSION, "entries": self.entries})
            atomic_write_text(self.path, text)


def working_copy(model: nn.Module) -> nn.Module:
    """A float copy with batch norms folded, as the quantization steps will see it."""
    work = copy.deepcopy(model).eval()
    fold_batchnorm(work)
    return work


def relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """``sum ||out - ref||^2 / sum ||ref||^2`` over batches."""
    num = sum(
        float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, refs, strict=True)
    )
    den = sum(float(r.double().pow(2).sum()) for r in refs)
    return num / max(den, 1e-30)


def _runner(model: nn.Module, batches: list) -> Callable[[nn.Module], list[torch.Tensor]]:
    mode = detect_call_mode(model, batches[0])

    def run(m: nn.Module) -> list[torch.Tensor]:
        return [main_output(call_model(m, b, mode)).float() for b in batches]

    return run


def format_weight(
    w: torch.Tensor, fmt: Format, original: torch.Tensor | None = None
) -> torch.Tensor:
    """``w`` rounded to ``fmt``; a ``ch<P>+`` format also zeroes the rows it removes (ranked
    on ``original``, the unfolded weight; ``w`` itself when None)."""
    out = rtn_weight(w, fmt.weight)
    if fmt.prune:
        out[pruned_rows(w if original is None else original, fmt)] = 0
    return out


def measured_scores(
    work: nn.Module,
    layers: list[str],
    formats: list[Format],
    batches: list,
    progress: bool = True,
    originals: dict[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """``(L, F)`` relative output error with only layer ``l`` rounded to format ``f``.

    A ``ch<P>+`` format zeroes the removed channels' weights and (folded) bias, which is the
    removal itself for the layers it fits (their outputs feed only the next layer).
    """
    run = _runner(work, batches)
    with torch.no_grad():
        refs = run(work)
        scores = np.zeros((len(layers), len(formats)))
        bar = tqdm(total=len(layers) * len(formats), desc="sensitivity", disable=not progress)
        for i, name in enumerate(layers):
            layer = work.get_submodule(name)
            w0 = layer.weight.detach().clone()
            b0 = layer.bias.detach().clone() if layer.bias is not None else None
            orig = (originals or {}).get(name)
            for j, fmt in enumerate(formats):
                if fmt.fits(layer):
                    layer.weight.copy_(format_weight(w0, fmt, orig))
                    if fmt.prune and b0 is not None:
                        layer.bias[pruned_rows(w0 if orig is None else orig, fmt)] = 0
                    scores[i, j] = relative_error(run(work), refs)
                    layer.weight.copy_(w0)
                    if b0 is not None:
                        layer.bias.copy_(b0)
                else:
                    scores[i, j] = np.nan
                bar.update()
        bar.close()
    return scores


def hessian_traces(
    work: nn.Module, layers: list[str], batches: list, samples: int = 8
) -> np.ndarray:
    """``(L,)`` Hutchinson traces of the relative-error loss's Hessian per layer weight."""
    run = _runner(work, batches)
    with torch.no_grad():
        refs = run(work)
    den = sum(float(r.double().pow(2).sum()) for r in refs)
    params = [work.get_submodule(n).weight for n in layers]
    flags = [p.requires_grad for p in work.parameters()]
    for p in work.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def loss() -> torch.Tensor:
        outs = run(work)
        return sum((o - r).pow(2).sum() for o, r in zip(outs, refs, strict=True)) / den

    try:
        traces = hutchinson_trace(loss, params, samples=samples)
    finally:
        for p, f in zip(work.parameters(), flags, strict=True):
            p.requires_grad_(f)
    return traces.numpy()


def hessian_scores(work: nn.Module, layers: list[str], formats: list[Format], traces) -> np.ndarray:
    """HAWQ-V2 ``1/2 Tr(H_l) / n_l * ||Q_f(W_l) - W_l||^2`` per (layer, format)."""
    scores = np.zeros((len(layers), len(formats)))
    for i, name in enumerate(layers):
        layer = work.get_submodule(name)
        w = layer.weight.detach()
        for j, fmt in enumerate(formats):
            if not fmt.fits(layer):
                scores[i, j] = np.nan
                continue
            err = float((format_weight(w, fmt) - w).double().pow(2).sum())
            scores[i, j] = 0.5 * float(traces[i]) / w.numel() * err
    return scores


def sensitivity(
    model: nn.Module,
    layers: list[str],
    formats: list[Format],
    batches: list,
    *,
    measure: str = "measured",
    cache: SensitivityCache | None = None,
    samples: int = 8,
    progress: bool = True,
) -> np.ndarray:
    """``(L, F)`` sensitivity of each layer at each format (NaN where a format does not fit).

    Example:
        >>> s = sensitivity(model, ["fc"], parse_formats("w2a8,w8a8"), batches)  # doctest: +SKIP
    """
    if measure not in MEASURES:
        raise CompactnnError(f"sensitivity measure={measure!r} must be one of {MEASURES}.")
    if not batches:
        raise CompactnnError("the search needs calibration data: pass calib_data=.")
    cache = cache or SensitivityCache(None)
    digests = data_digests(model, batches)
    keys = [cache_key(digests, f, measure) for f in formats]
    cached = [cache.get(k, layers) for k in keys]
    missing = [j for j, c in enumerate(cached) if c is None]
    scores = np.array([c if c is not None else [0.0] * len(layers) for c in cached]).T
    scores = scores.reshape(len(layers), len(formats))
    if missing:
        work = working_copy(model)
        todo = [formats[j] for j in missing]
        if measure == "measured":
            originals = {n: model.get_submodule(n).weight.detach() for n in layers}
            fresh = measured_scores(work, layers, todo, batches, progress, originals)
        else:
            fresh = hessian_scores(
                work, layers, todo, hessian_traces(work, layers, batches, samples)
            )
        for col, j in enumerate(missing):
            scores[:, j] = fresh[:, col]
            cache.put(keys[j], layers, [float(v) for v in fresh[:, col]])
    return scores
