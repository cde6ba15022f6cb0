"""The training run's JSON-lines log: one record per epoch, and its human line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compactnn.errors import CompactnnError
from compactnn.export.fs import atomic_write_text


class EpochLog:
    """The JSON-lines training log: one record per epoch, flushed as each epoch ends.

    A fresh run truncates the file (``check_log_path`` refused an existing one without
    ``force``); a run resumed from a checkpoint rewrites it with the ``records`` of the
    epochs the checkpoint holds (so an epoch logged after the checkpoint was written is not
    logged twice, nor one checkpointed but not logged missing), then appends. ``append``
    without ``records`` (a checkpoint of an older compactnn) appends to the file as it is.
    """

    def __init__(
        self, path: str | Path | None, append: bool, records: list[dict] | None = None
    ) -> None:
        self.path = None if path is None else Path(path)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if records is not None:
                lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
                atomic_write_text(self.path, lines)
                return
            with self.path.open("a" if append else "w", encoding="utf-8"):
                pass
        except OSError as exc:
            raise CompactnnError(
                f"log_path {str(self.path)!r} cannot be written ({exc.strerror or exc}); pass a "
                "file in a writable directory."
            ) from exc

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")


def check_log_path(path: str | Path | None, appends: bool, force: bool) -> None:
    """Refuse, before any work, a ``log_path`` that is an existing file this run would
    truncate: allowed with ``force``, or when a resumed run ``appends`` to it."""
    if path is not None and os.path.lexists(path) and not (force or appends):
        raise CompactnnError(
            f"log_path {str(path)!r} exists; pass force=True to replace it, or another "
            "log_path (a run resumed from checkpoint_dir appends to its log)."
        )


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """One human line for an epoch record of the training log.

    Example:
        >>> format_epoch({"epoch": 2, "train_loss": 0.4312, "train_top1": 88.3,
        ...               "eval_top1": 91.41, "seconds": 0.8, "lr": 0.001}, 4)
        'epoch 2/4: train loss 0.4312, train top-1 88.30%, eval top-1 91.41%, 0.8 s, lr 0.001'
    """
    loss = record.get("train_loss")
    parts = [
        f"epoch {record['epoch']}/{epochs}: train loss {'nan' if loss is None else f'{loss:.4f}'}"
    ]
    parts.append(f"train top-1 {record['train_top1']:.2f}%")
    if record.get("eval_top1") is not None:
        parts.append(f"eval top-1 {record['eval_top1']:.2f}%")
    parts.append(f"{record['seconds']:.1f} s, lr {record['lr']:.3g}")
    return ", ".join(parts)
