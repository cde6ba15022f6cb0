"""What a search is given and what it returns: :class:`Budget` and :class:`SearchResult`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from compactnn.errors import CompactnnError, name_list
from compactnn.export.artifact import artifact_exists, check_writable, foreign_entries
from compactnn.export.fs import atomic_write_text
from compactnn.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class Budget:
    """Limits of a search; at least one is set.

    Args:
        max_bytes: artifact bytes of the searched layers (codes, scales, zeros, biases).
        avg_bits: average weight bits over the searched layers' weights (code bits only).
        max_bops: bit-operations per sample, ``sum MACs * w_bits * a_bits``.
        max_latency_ratio: deployed latency at most this fraction of the uniform recipe of
            the widest format (e.g. ``w8a8``), by the per-layer lookup table; needs
            ``latency_example`` in :func:`search`.

    Example:
        >>> Budget(avg_bits=3.0).limits({"code_bits": 10.0})
        {'code_bits': 30.0}
    """

    max_bytes: float | None = None
    avg_bits: float | None = None
    max_bops: float | None = None
    max_latency_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_bytes", "avg_bits", "max_bops", "max_latency_ratio"):
            v = getattr(self, name)
            bad = isinstance(v, bool) or not isinstance(v, (int, float))
            if v is not None and (bad or not math.isfinite(v) or v <= 0):
                raise CompactnnError(
                    f"Budget.{name}={v!r} must be a positive finite number (not a bool) or None."
                )

    def limits(self, weights: dict[str, float]) -> dict[str, float]:
        """Budget rows for :func:`allocate`; ``weights["code_bits"]`` is the total weight count."""
        out = {}
        if self.max_bytes is not None:
            out["bytes"] = float(self.max_bytes)
        if self.avg_bits is not None:
            out["code_bits"] = float(self.avg_bits) * weights["code_bits"]
        if self.max_bops is not None:
            out["bops"] = float(self.max_bops)
        return out


@dataclasses.dataclass
class SearchResult:
    """What a search found.

    Attributes:
        recipe: the per-layer recipe (``compactnn.compress(model, result.recipe)`` runs it).
        assignment: layer name -> format name.
        layers: the searched layers in execution order.
        formats: the candidate format names.
        scores: ``(L, F)`` sensitivities; ``costs``: name -> ``(L, F)`` cost tables.
        predicted: summed sensitivity of the assignment; ``cost``: its totals per cost name.
        frontier: allocations along the byte budget: cost, predicted score, assignment.
        latency: the per-layer latency table's inputs (each uniform format's measured
            milliseconds) and the whole-model check of the result (measured vs proxy).
        groups: the residual groups searched (layers, options, evidence, the chosen option).
        tried: every fully evaluated configuration (accuracy-aware mode).
        budget: what the search was run under: the :class:`Budget` limits given and
            ``max_drop`` / ``max_evals``; with ``max_drop`` also ``baseline``, ``quality``
            and ``drop`` (the float model's quality, the chosen recipe's, their difference);
            with ``max_latency_ratio`` also ``met`` and ``measured_ratio`` (the deployed
            check, the larger of wall and CPU ratios) and, when missed, ``not_met`` (why).
        left_out: quantizable layers the search does not price, with why (a Linear tied to
            an embedding table: compress quantizes it only with that table).
        baseline: the float model's quality (accuracy-aware mode).
        seconds: wall time of the search.
    """

    recipe: Recipe
    assignment: dict[str, str]
    layers: list[str]
    formats: list[str]
    scores: np.ndarray
    costs: dict[str, np.ndarray]
    predicted: float
    cost: dict[str, float]
    frontier: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tried: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    baseline: float | None = None
    seconds: float = 0.0
    latency: dict[str, Any] = dataclasses.field(default_factory=dict)
    groups: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    left_out: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (``search.json``)."""
        return {
            "budget": self.budget,
            "assignment": self.assignment,
            "formats": self.formats,
            "layers": self.layers,
            "left_out": self.left_out,
            "predicted": self.predicted,
            "cost": self.cost,
            "scores": {
                n: dict(zip(self.formats, map(_num, row), strict=True))
                for n, row in zip(self.layers, self.scores, strict=True)
            },
            "bytes": {
                n: dict(zip(self.formats, map(int, row), strict=True))
                for n, row in zip(self.layers, self.costs["bytes"], strict=True)
            },
            "frontier": self.frontier,
            "tried": self.tried,
            "baseline": self.baseline,
            "seconds": self.seconds,
            "latency": self.latency,
            "groups": self.groups,
            "latency_table_ms": {
                n: dict(zip(self.formats, map(float, row), strict=True))
                for n, row in zip(self.layers, self.costs.get("latency", []), strict=False)
            },
        }

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write ``recipe.yaml`` and ``search.json`` into the folder ``out``; return ``out``.

        Each file is written atomically (a temporary file renamed into place). ``out`` may be
        new, empty, or hold only the search's own ``sensitivity.json`` (the ``cache_dir``).

        Args:
            out: the folder (created with its parents when missing).
            force: replace an earlier search's ``recipe.yaml`` and ``search.json`` there.

        Raises:
            CompactnnError: ``out`` is a file, holds a compactnn artifact (its own
                ``recipe.yaml`` would be replaced and the artifact broken), holds other
                files, holds an earlier search's results and ``force`` is False, or is not
                writable. Nothing is written then.

        Example:
            >>> result.save("out/search")  # doctest: +SKIP
        """
        out = check_search_folder(out, force)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", self.recipe.to_yaml())
        atomic_write_text(out / "search.json", json.dumps(self.to_dict(), indent=1))
        return out


SEARCH_FILES = frozenset({"recipe.yaml", "search.json", "sensitivity.json"})
RESULT_FILES = ("recipe.yaml", "search.json")


def check_search_folder(out: str | Path, force: bool, cli: bool = False) -> Path:
    """Refuse, before anything is written, a folder the search's files would damage.

    Args:
        out: the folder for ``recipe.yaml``, ``search.json`` and ``sensitivity.json``.
        force: an earlier search's results there may be replaced.
        cli: word the messages for the command line (``--out``, ``--force``).

    Returns:
        ``out`` as a ``Path``.

    Raises:
        CompactnnError: ``out`` is a file, holds a compactnn artifact (even with ``force``),
            holds files a search does not write (even with ``force``), holds an earlier
            search's results without ``force``, or is not writable. Each message names
            the path and the way out.

    Example:
        >>> check_search_folder("out/new-search", force=False)  # doctest: +SKIP
    """
    out = Path(out)
    label = f"--out {str(out)!r}" if cli else f"search folder {str(out)!r}"
    force_word = "--force" if cli else "force=True"
    example = "--out out/search" if cli else "result.save('out/search')"
    if artifact_exists(out):
        raise CompactnnError(
            f"{label} holds a compactnn artifact: the search's recipe.yaml would replace the "
            f"artifact's and break it. Choose a new folder, e.g. {example}."
        )
    if os.path.lexists(out) and not out.is_dir():
        raise CompactnnError(f"{label} is a file; name a folder, e.g. {example}.")
    names = foreign_entries(out) if out.is_dir() else []
    if others := [n for n in names if n not in SEARCH_FILES]:
        raise CompactnnError(
            f"{label} is not empty (it has {name_list(others, 3)}): the search would mix its "
            f"files with those. Choose an empty or new folder ({force_word} only replaces an "
            "earlier search's results)."
        )
    if not names:  # a new or empty folder
        check_writable(out, force=False, what="--out" if cli else "out")  # system folders
        return out
    if any(n in RESULT_FILES for n in names) and not force:
        raise CompactnnError(
            f"{label} holds an earlier search's results; pass {force_word} to replace them "
            "or choose a new folder."
        )
    if not os.access(out, os.W_OK | os.X_OK):
        raise CompactnnError(f"{label} is not writable; choose another folder.")
    return out


def _num(v: float) -> float | None:
    return None if np.isnan(v) else float(v)
