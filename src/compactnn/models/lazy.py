"""Image references whose data is read on first use only.

A reference model cached on disk needs no data to be built: its cache key names its data by
a fixed fingerprint (:func:`lazy_image_reference`), and its calibration batches, example
batch and scores read the data set the first time they are used. A data-free run
(``--data data-free``) or a run on the user's own ``--data`` file never opens (nor needs)
the reference's data file; where the data is needed and cannot be read, the error is one
line naming the file.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from compactnn.core.seeding import seeded_rng
from compactnn.data import split as split_module
from compactnn.data.split import Split
from compactnn.errors import CompactnnError, first_line, user_stacklevel
from compactnn.models import cache, fit
from compactnn.models.reference import Reference

_LAZY = object()  # "read on first use": what LazyReference's constructor passes itself


class LazyReference(Reference):
    """A :class:`Reference` whose ``calib`` and ``example`` are made by ``data()`` on first
    use (once); a value assigned to either replaces it, as for a plain Reference."""

    def __init__(self, *, data: Callable[[], tuple[list, Any]], **fields: Any) -> None:
        self._data = functools.cache(data)
        super().__init__(calib=_LAZY, example=_LAZY, **fields)

    def _field(index: int, name: str) -> property:
        def get(self: LazyReference) -> Any:
            given = self.__dict__.get(name, _LAZY)
            return self._data()[index] if given is _LAZY else given

        def put(self: LazyReference, value: Any) -> None:
            self.__dict__[name] = value

        return property(get, put)

    calib = _field(0, "_calib")
    example = _field(1, "_example")
    del _field


def read_split(load: Callable[[], Split], name: str, what: str) -> Split:
    """``load()``, its unreadable file (missing, no permission, damaged) refused in one
    line naming the file and what needed it."""
    try:
        return load()
    except CompactnnError:
        raise
    except (OSError, EOFError, ValueError) as exc:
        where = getattr(exc, "filename", None)
        where = f" {str(where)!r}" if where else ""
        why = getattr(exc, "strerror", None) if where else None
        base = f"{name} cannot read {what} from its file{where}: {why or first_line(exc)}"
        raise DataUnreadable(
            f"{base}. Make the file readable (reinstall the package that ships it if it is "
            "damaged), or pass your own --data FILE (or --data data-free to calibrate without "
            "real data).",
            base,
        ) from exc


class DataUnreadable(CompactnnError):
    """A reference's data file cannot be read; ``base`` says which file and why."""

    def __init__(self, message: str, base: str) -> None:
        super().__init__(message)
        self.base = base


def seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make()`` with its initial weights drawn from ``seed``; the global RNG is restored."""
    with seeded_rng(seed):
        return make()


def split_desc(split: Split) -> str:
    """A short fingerprint of a split (sizes and normalisation) for cache keys."""
    shapes = f"{tuple(split.x_train.shape)}/{tuple(split.x_test.shape)}"
    return f"{shapes}/{split.mean:.6f}/{split.std:.6f}"


def lazy_image_reference(
    name: str,
    make: Callable[[], nn.Module],
    load_split: Callable[[], Split],
    fingerprint: str,
    sources: list[ModuleType],
    *,
    seed: int,
    cfg: fit.FitConfig,
    progress: bool,
    n_calib: int = 512,
    calib_batch: int = 64,
) -> Reference:
    """:func:`compactnn.models.image.image_reference` with its data read on first use.

    ``fingerprint`` stands for the data in the cache key: it must equal
    ``split_desc(load_split())`` (checked, with a warning, once the data is read).
    ``load_split`` is only called to train (nothing cached yet), for calibration batches, the
    example batch, or a score.
    """
    files = cache.module_sources(
        *sources, sys.modules[__name__], fit, split_module, sys.modules[Reference.__module__]
    )
    key = cache.cache_key(name, files, seed=seed, fit=repr(cfg), data=fingerprint)

    @functools.cache
    def split() -> Split:
        data = load_split()
        if (found := split_desc(data)) != fingerprint:
            warnings.warn(
                f"{name}: its data set reads as {found}, not {fingerprint} as its cache key "
                "says: scores may differ from the documented ones.",
                stacklevel=user_stacklevel(),
            )
        return data

    def train(model: nn.Module) -> dict[str, str]:
        try:
            data = split()
        except DataUnreadable as exc:  # --data FILE or data-free cannot stand in for it
            raise CompactnnError(
                f"{exc.base}. {name} is trained on it once per machine (nothing is cached "
                "yet), which your own --data or --data data-free cannot replace: make the file "
                "readable (reinstall the package that ships it if it is damaged)."
            ) from exc
        start, cpu_start = time.perf_counter(), time.process_time()
        score = fit.train_classifier(model, data, cfg, seed, f"training {name}", progress)
        return {
            "seed": str(seed),
            "top1": f"{score:.2f}",
            "train_seconds": f"{time.perf_counter() - start:.1f}",
            "train_cpu_seconds": f"{time.process_time() - cpu_start:.1f}",
        }

    def data() -> tuple[list, torch.Tensor]:
        s = split()
        return list(torch.split(s.x_train[:n_calib], calib_batch)), s.x_test[:64]

    model, _ = cache.load_or_train(name, key, seeded(make, seed), train)
    model.eval()
    return LazyReference(
        data=data,
        name=name,
        model=model,
        evaluate=lambda m: fit.top1(m, split().x_test, split().y_test),
        metric="top1",
        kind="cnn",
        skeleton=lambda: make().eval(),
    )
