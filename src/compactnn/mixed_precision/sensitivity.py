"""Per-layer sensitivity: how much the model's output moves when one layer is quantized.

Two measures, both on calibration data only (never held-out data):

* ``measured``: the relative output error when only layer ``l`` is rounded to format ``f``
  (min-max round-to-nearest), ``s[l, f] = sum_b ||y_b(W_l -> Q_f(W_l)) - y_b||^2 / sum_b
  ||y_b||^2``; one forward pass per (layer, format).
* ``hessian`` (HAWQ-V2): ``s[l, f] = 1/2 * Tr(H_l) / n_l * ||Q_f(W_l) - W_l||^2``, the
  second-order change of the same loss, with ``Tr(H_l)`` from Hutchinson's estimator
  (:func:`compactnn.core.hessian.hutchinson_trace`) and ``n_l`` the layer's weight count.

Results are cached per (model, data, format, measure) in a JSON file the caller names (the
search's output folder, or the command line's per-user cache): the key hashes the model's
structure, parameters and buffers, the calibration batches measured on, the format, the
measure, and the compactnn version and code, so a changed model, data set or compactnn never
reads a stale entry.
The file is rewritten atomically after each format's scores (a killed search keeps them);
a damaged or foreign file is ignored with one warning, and a file that cannot be written
leaves the scores in memory only (one warning).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compactnn.core.calib import call_model, detect_call_mode, main_output
from compactnn.core.digest import tensors_sha256
from compactnn.core.fold import fold_batchnorm
from compactnn.core.hessian import hutchinson_trace
from compactnn.core.progress import bar as progress_bar
from compactnn.errors import CompactnnError, user_stacklevel
from compactnn.export.fs import atomic_write_text
from compactnn.mixed_precision.formats import Format, pruned_rows, rtn_weight

CACHE_VERSION = 2  # 2: the model digest covers names, buffers and structure
MAX_ENTRIES = 512  # (model, data, format, measure) entries a cache file keeps, newest last
MEASURES = ("measured", "hessian")
_KEY = re.compile(r"[0-9a-f]{64}")
# sensitivity() calls inside cache_report(): what each took from the cache (see there)
_REPORT: ContextVar[list[dict[str, Any]] | None] = ContextVar("sensitivity_report", default=None)


def _batch_items(i: int, batch: Any) -> list[tuple[str, Any]]:
    if isinstance(batch, torch.Tensor):
        return [(f"{i}", batch)]
    if isinstance(batch, dict):
        return [(f"{i}.{k}", batch[k]) for k in sorted(batch, key=str)]
    return [(f"{i}.{j}", t) for j, t in enumerate(batch)]


def data_digests(model: nn.Module, batches: list) -> tuple[str, str]:
    """Digests of the model (its structure, every parameter and buffer by name) and of the
    calibration batches (every tensor and other value, by position and key)."""
    state = [*model.state_dict().items(), *(("buffer:" + n, b) for n, b in model.named_buffers())]
    model_digest = tensors_sha256([("structure", repr(model)), *state])
    data = [x for i, b in enumerate(batches) for x in _batch_items(i, b)]
    return model_digest, tensors_sha256(data)


@functools.cache
def _code_version() -> str:
    """The compactnn version and a digest of the code the scores come from (this module,
    the formats' rounding, the quantizer): a persistent cache never outlives an edit."""
    try:
        version = importlib.metadata.version("compactnn")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    h = hashlib.sha256(version.encode())
    for module in (__name__, Format.__module__, "compactnn.core.quantize"):
        with contextlib.suppress(OSError, KeyError, TypeError):
            h.update(Path(sys.modules[module].__file__ or "").read_bytes())
    return h.hexdigest()[:16]


def cache_key(digests: tuple[str, str], fmt: Format, measure: str) -> str:
    """Key of one (model, data, format, measure) entry."""
    text = json.dumps([CACHE_VERSION, _code_version(), *digests, fmt.name, measure])
    return hashlib.sha256(text.encode()).hexdigest()


def _score(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isinf(x)


def read_entries(path: Path) -> tuple[dict[str, dict[str, float]], str | None]:
    """The entries of the cache file ``path`` and None, or ``({}, why it is not trusted)``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return {}, f"it cannot be read ({exc.strerror or exc})"
    except ValueError:  # UnicodeDecodeError included
        return {}, "it is damaged (not JSON)"
    if not isinstance(data, dict) or set(data) != {"version", "entries"}:
        return {}, "it is not a compactnn sensitivity cache"
    if data["version"] != CACHE_VERSION:
        return {}, f"it is a cache of version {data['version']!r}, not {CACHE_VERSION}"
    entries = data["entries"]
    if not isinstance(entries, dict) or not all(
        isinstance(k, str)
        and _KEY.fullmatch(k)
        and isinstance(v, dict)
        and all(isinstance(n, str) and _score(x) for n, x in v.items())
        for k, v in entries.items()
    ):
        return {}, "its entries are damaged"
    return entries, None


def write_entries(path: Path, entries: dict[str, dict[str, float]], merge: bool = True) -> None:
    """Write ``entries`` to ``path`` atomically; ``merge``: after the valid entries the file
    already holds (another search's), at most :data:`MAX_ENTRIES` in all, newest last."""
    kept = read_entries(path)[0] if merge and path.is_file() else {}
    kept = {k: v for k, v in kept.items() if k not in entries} | entries
    kept = dict(list(kept.items())[-MAX_ENTRIES:])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "entries": kept}))


class SensitivityCache:
    """A JSON file of ``key -> {layer: score}``; ``path=None`` keeps nothing.

    A damaged or foreign file is ignored (one warning; it is replaced at the first write);
    a file that cannot be written keeps the scores in memory only (one warning)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, float]] = {}
        if self.path is not None and self.path.is_file():
            self.entries, why = read_entries(self.path)
            if why:  # never trusted: its scores are measured again
                warnings.warn(
                    f"ignoring the sensitivity cache {self.path}: {why}; its scores are "
                    "measured again and the file replaced.",
                    stacklevel=user_stacklevel(),
                )

    def get(self, key: str, names: list[str]) -> list[float] | None:
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or not all(n in entry for n in names):
            return None
        return [float(entry[n]) for n in names]

    def put(self, key: str, names: list[str], values: list[float]) -> None:
        self.entries[key] = dict(zip(names, map(float, values), strict=True))
        if self.path is not None:
            try:
                write_entries(self.path, self.entries)
            except (OSError, CompactnnError) as exc:  # read-only, full disk, a file in the way
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                warnings.warn(
                    f"cannot write the sensitivity cache {self.path} ({why}): the search goes "
                    "on uncached; give a writable cache folder to keep its scores.",
                    stacklevel=user_stacklevel(),
                )
                self.path = None


@contextlib.contextmanager
def cache_report() -> Iterator[list[dict[str, Any]]]:
    """A list that each :func:`sensitivity` call inside appends to: ``formats`` (how many),
    ``cached`` (how many came from the cache) and ``entries`` (key -> scores, in the cache
    file's form)."""
    found: list[dict[str, Any]] = []
    token = _REPORT.set(found)
    try:
        yield found
    finally:
        _REPORT.reset(token)


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
    done: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """``(L, F)`` relative output error with only layer ``l`` rounded to format ``f``;
    ``done(j, column)`` is called as each format's column is complete (the cache keeps it).

    A ``ch<P>+`` format zeroes the removed channels' weights and (folded) bias, which is the
    removal itself for the layers it fits (their outputs feed only the next layer).
    """
    run = _runner(work, batches)
    with torch.no_grad():
        refs = run(work)
        scores = np.zeros((len(layers), len(formats)))
        bar = progress_bar(total=len(layers) * len(formats), desc="sensitivity", progress=progress)
        for j, fmt in enumerate(formats):
            for i, name in enumerate(layers):
                layer = work.get_submodule(name)
                if not fmt.fits(layer):
                    scores[i, j] = np.nan
                    bar.update()
                    continue
                w0 = layer.weight.detach().clone()
                b0 = layer.bias.detach().clone() if layer.bias is not None else None
                orig = (originals or {}).get(name)
                layer.weight.copy_(format_weight(w0, fmt, orig))
                if fmt.prune and b0 is not None:
                    layer.bias[pruned_rows(w0 if orig is None else orig, fmt)] = 0
                try:
                    scores[i, j] = relative_error(run(work), refs)
                finally:
                    layer.weight.copy_(w0)
                    if b0 is not None:
                        layer.bias.copy_(b0)
                bar.update()
            if done is not None:
                done(j, scores[:, j])
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
    how = measure if measure == "measured" else f"{measure}/{samples}"
    keys = [cache_key(digests, f, how) for f in formats]
    cached = [cache.get(k, layers) for k in keys]
    missing = [j for j, c in enumerate(cached) if c is None]
    scores = np.array([c if c is not None else [0.0] * len(layers) for c in cached]).T
    scores = scores.reshape(len(layers), len(formats))

    def keep(col: int, column: np.ndarray) -> None:  # each format's scores as they come
        j = missing[col]
        scores[:, j] = column
        cache.put(keys[j], layers, [float(v) for v in column])

    if missing:
        work = working_copy(model)
        todo = [formats[j] for j in missing]
        if measure == "measured":
            originals = {n: model.get_submodule(n).weight.detach() for n in layers}
            measured_scores(work, layers, todo, batches, progress, originals, keep)
        else:
            fresh = hessian_scores(
                work, layers, todo, hessian_traces(work, layers, batches, samples)
            )
            for col in range(len(missing)):
                keep(col, fresh[:, col])
    report = _REPORT.get()
    if report is not None:
        entries = {k: {n: float(v) for n, v in zip(layers, scores[:, j], strict=True)}
                   for j, k in enumerate(keys)}  # fmt: skip
        report.append({"formats": len(formats), "cached": len(formats) - len(missing),
                       "entries": entries})  # fmt: skip
    return scores
