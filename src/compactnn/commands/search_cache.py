"""Where ``compactnn search`` keeps its sensitivity scores between runs.

The scores (the slow part of a search) are cached per user, outside ``--out``, in
``$COMPACTNN_SEARCH_CACHE``, else ``$COMPACTNN_CACHE/search/`` (else
``$XDG_CACHE_HOME/compactnn/search/``, else ``~/.cache/compactnn/search/``: the folder of the
reference models' cache), one format at a
time as they are measured: a search killed halfway (Ctrl-C, SIGTERM, out of time) keeps what
it measured and its rerun measures only the rest. The keys
(:func:`compactnn.mixed_precision.sensitivity.cache_key`) cover the model, the data, the
format and the measure, so nothing else reuses them. ``--out`` still receives the search's
own scores as ``sensitivity.json``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from compactnn.errors import CompactnnError
from compactnn.mixed_precision.sensitivity import (
    SensitivityCache,
    read_entries,
    write_entries,
)

SENSITIVITY = "sensitivity.json"


def cache_root() -> Path:
    """The per-user cache folder of the search's scores (not created here):
    ``$COMPACTNN_SEARCH_CACHE`` itself when set (e.g. one folder per experiment or test run)."""
    if explicit := os.environ.get("COMPACTNN_SEARCH_CACHE"):
        return Path(explicit)
    root = os.environ.get("COMPACTNN_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(xdg, "compactnn")
    return Path(root) / "search"


def cache_folder(staging: Path) -> Path:
    """The per-user cache folder when it can be written to, else ``staging`` (a temporary
    folder: the search runs uncached) with one warning line saying why and what to set."""
    folder = cache_root()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        print(
            f"warning: cannot write the search cache {folder} ({exc.strerror or exc}): this "
            "search runs uncached (stopped, it starts again from zero); set COMPACTNN_CACHE "
            "to a writable folder to keep its scores.",
            file=sys.stderr,
        )
        return staging
    return folder


def seed(folder: Path, earlier: Path) -> None:
    """An earlier search's scores in ``--out`` (``earlier``, replaced with ``--force``) join
    the cache in ``folder``; a damaged or foreign file is ignored with one warning."""
    if not earlier.is_file():
        return
    entries = SensitivityCache(earlier).entries  # warns when not trusted
    if not entries:
        return
    target = folder / SENSITIVITY
    own = read_entries(target)[0] if target.is_file() else {}
    new = {k: v for k, v in entries.items() if k not in own}
    if new:
        try:
            write_entries(target, new)
        except (OSError, CompactnnError):
            pass  # the search's first write says so, once


def write_scores(path: Path, report: list[dict[str, Any]]) -> None:
    """This search's scores (every :func:`~compactnn.mixed_precision.sensitivity.sensitivity`
    call's, from ``report``) into ``path``, atomically, in the cache file's form."""
    entries: dict[str, dict[str, float]] = {}
    for call in report:
        entries.update(call["entries"])
    if entries:
        write_entries(path, entries, merge=False)


def cache_line(report: list[dict[str, Any]], folder: Path, staging: Path) -> str | None:
    """The summary line on the cache: ``sensitivity: 12 of 18 formats from the cache in
    DIR``, or where the scores measured now are kept; None without a sensitivity pass."""
    if not report:
        return None
    formats = sum(call["formats"] for call in report)
    cached = sum(call["cached"] for call in report)
    where = "--out's earlier sensitivity.json" if folder == staging else f"the cache in {folder}"
    if cached:
        return f"  sensitivity: {cached} of {formats} formats from {where}"
    if folder == staging:
        return f"  sensitivity: {formats} formats measured (not cached)"
    return f"  sensitivity: {formats} formats measured, cached in {folder}"
