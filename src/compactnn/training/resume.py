"""What a checkpoint keeps of the epoch under way, so that a resumed run continues it exactly.

A run stopped in the middle of an epoch (``max_steps``, or killed after a ``max_steps``
checkpoint) resumes with the epoch's running sums (loss, correct predictions, samples), its
first step's learning rate and the seconds spent so far, so that the epoch's record (and
the artifact's history) equals the uninterrupted run's. It also keeps the global torch RNG
state at the epoch's start: a shuffling ``DataLoader`` (``shuffle=True`` without a
``generator``) draws its order from it when its iterator is made, so the resumed run makes
its iterator from that state, skips the batches already run, then goes on from the RNG
state saved at the stop. A ``DataLoader`` with its own ``generator`` (or a sampler with one)
draws from that generator instead: its state is kept and replayed the same way
(:func:`loader_generators`), and the data fingerprint is taken without advancing it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch

from compactnn.errors import CompactnnError


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a loader shuffles (or samples) with: its own
    ``generator``, its sampler's and its batch sampler's sampler's (each once)."""
    if loader is None:
        return []
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None))
    gens: list[torch.Generator] = []
    for owner in owners:
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in gens):
            gens.append(gen)
    return gens


def rng_state(gens: list[torch.Generator]) -> dict[str, Any]:
    """The global torch RNG state and the loader generators' states, for a checkpoint."""
    return {"rng": torch.get_rng_state(), "loader_rng": [g.get_state() for g in gens]}


def set_rng_state(state: dict[str, Any], gens: list[torch.Generator], key: str = "rng") -> None:
    """Put back what :func:`rng_state` saved (``key``: where the global state is); a
    checkpoint of an older compactnn that kept no generator states leaves them alone.

    Raises:
        CompactnnError: the checkpoint's loader had another number of generators.
    """
    torch.set_rng_state(state[key])
    saved = state.get("loader_rng")
    if saved is None:
        return
    if len(saved) != len(gens):
        raise CompactnnError(
            f"the checkpoint's DataLoader shuffled with {len(saved)} torch.Generator(s), this "
            f"run's with {len(gens)}: resume with a loader built as the interrupted run's "
            "(the same generator= or sampler), or pass resume=False (--no-resume) to start over."
        )
    for gen, s in zip(gens, saved, strict=True):
        gen.set_state(s)


@contextlib.contextmanager
def keeps_loader_rng(loader: Any):
    """The global torch RNG and ``loader``'s generators as they were, whatever the block
    draws from them (a look at the loader's first batch must not change its shuffling)."""
    gens = loader_generators(loader)
    saved = [g.get_state() for g in gens]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for gen, s in zip(gens, saved, strict=True):
                gen.set_state(s)


class EpochProgress:
    """The epoch under way: running sums, first-step learning rate, start time and the
    RNG states at its start (the global torch one and the loader's generators')."""

    def __init__(self, lr: float, gens: list[torch.Generator] = ()) -> None:
        self.sums = [0.0, 0, 0]  # loss * samples, correct predictions, samples
        self.lr = lr
        self.t0 = time.perf_counter()
        self.rng = torch.get_rng_state()
        self.loader_rng = [g.get_state() for g in gens]

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def state(self, sums: list[float]) -> dict[str, Any]:
        """For the checkpoint; ``sums`` are the running sums over every rank."""
        return {
            "sums": list(sums),
            "lr": self.lr,
            "seconds": self.seconds(),
            "rng": self.rng,
            "loader_rng": self.loader_rng,
        }

    @classmethod
    def restore(cls, state: dict[str, Any], is_main: bool) -> EpochProgress:
        """The epoch as a checkpoint left it (its sums on rank 0 only: every rank adds its
        own from here, and the epoch's end sums them over the ranks)."""
        p = cls(state["lr"])
        p.sums = list(state["sums"]) if is_main else [0.0, 0, 0]
        p.t0 = time.perf_counter() - state["seconds"]
        p.rng = state["rng"]
        p.loader_rng = state.get("loader_rng")  # None: an older compactnn's checkpoint
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


def epoch_batches(data, batch_size: int, epoch: int, seed: int, done: int, p) -> Iterator:
    """``(index, batch)`` of the epoch's batches after the first ``done``. For a loader,
    its iterator is made from the RNG states at the epoch's start (``p``, an
    :class:`EpochProgress`; None: the current states) and the skipped batches are drawn
    from it, then the current states are put back, so a shuffling loader gives the order
    the uninterrupted run had."""
    batches = enumerate(data.batches(batch_size, epoch, seed))
    if done == 0:
        return batches
    if data.loader is None or p is None:
        return islice(batches, done, None)
    gens = loader_generators(data.loader)
    now = rng_state(gens)
    set_rng_state({"rng": p.rng, "loader_rng": p.loader_rng}, gens)
    for _ in islice(batches, done):  # makes the loader's iterator, as at the epoch's start
        pass
    set_rng_state(now, gens)
    return batches
