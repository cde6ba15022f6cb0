"""What a checkpoint keeps of the epoch under way, so that a resumed run continues it exactly.

A run stopped in the middle of an epoch (``max_steps``, or killed after a ``max_steps``
checkpoint) resumes with the epoch's running sums (loss, correct predictions, samples), its
first step's learning rate and the seconds spent so far, so that the epoch's record (and
the artifact's history) equals the uninterrupted run's. It also keeps the global torch RNG
state at the epoch's start: a shuffling ``DataLoader`` (``shuffle=True`` without a
``generator``) draws its order from it when its iterator is made, so the resumed run makes
its iterator from that state, skips the batches already run, then goes on from the RNG
state saved at the stop.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch


class EpochProgress:
    """The epoch under way: running sums, first-step learning rate, start time and the
    global torch RNG state at its start."""

    def __init__(self, lr: float) -> None:
        self.sums = [0.0, 0, 0]  # loss * samples, correct predictions, samples
        self.lr = lr
        self.t0 = time.perf_counter()
        self.rng = torch.get_rng_state()

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def state(self, sums: list[float]) -> dict[str, Any]:
        """For the checkpoint; ``sums`` are the running sums over every rank."""
        return {"sums": list(sums), "lr": self.lr, "seconds": self.seconds(), "rng": self.rng}

    @classmethod
    def restore(cls, state: dict[str, Any], is_main: bool) -> EpochProgress:
        """The epoch as a checkpoint left it (its sums on rank 0 only: every rank adds its
        own from here, and the epoch's end sums them over the ranks)."""
        p = cls(state["lr"])
        p.sums = list(state["sums"]) if is_main else [0.0, 0, 0]
        p.t0 = time.perf_counter() - state["seconds"]
        p.rng = state["rng"]
        return p


def epoch_record(epoch: int, step: int, history, top1: float | None, p: EpochProgress) -> dict:
    """The log's record of the epoch ``epoch`` (0-based) just done (``history``: the run's
    lists, its loss and top-1 last)."""
    return {
        "epoch": epoch + 1,
        "step": step,
        "train_loss": _finite(history["loss"][-1], 6),
        "train_top1": _finite(history["train_top1"][-1]),
        "eval_top1": _finite(top1),
        "seconds": round(p.seconds(), 3),
        "lr": p.lr,
    }


def _finite(v: float | None, ndigits: int = 4) -> float | None:
    return round(v, ndigits) if v is not None and math.isfinite(v) else None


def epoch_batches(data, batch_size: int, epoch: int, seed: int, done: int, rng) -> Iterator:
    """``(index, batch)`` of the epoch's batches after the first ``done``. For a loader,
    its iterator is made from ``rng`` (the RNG state at the epoch's start; None: the current
    state) and the skipped batches are drawn from it, then the current RNG state is put back,
    so a shuffling loader gives the order the uninterrupted run had."""
    batches = enumerate(data.batches(batch_size, epoch, seed))
    if done == 0:
        return batches
    if data.loader is None or rng is None:
        return islice(batches, done, None)
    now = torch.get_rng_state()
    torch.set_rng_state(rng)
    for _ in islice(batches, done):  # makes the loader's iterator, as at the epoch's start
        pass
    torch.set_rng_state(now)
    return batches


def keeps_caller_rng(fn):
    """``fn`` with the caller's global torch RNG states (CPU, and CUDA once initialised)
    put back when it returns or raises: ``train`` seeds them for its own run only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    return wrapper
