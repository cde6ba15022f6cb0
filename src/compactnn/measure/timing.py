"""Latency: explicit threads, warm-up, then the median of >= 10 timed runs (BENCHMARKING.md).

Example:
    >>> t = time_fn(lambda: sum(range(1000)), warmup=2, runs=10, threads=1)
    >>> t.runs
    10
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model

DEFAULT_THREADS = 2
DEFAULT_WARMUP = 3
DEFAULT_RUNS = 10


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in seconds.

    Attributes:
        median_s: median over the timed runs (the number to quote).
        min_s: fastest run.
        max_s: slowest run.
        runs: timed runs (after ``warmup`` untimed calls).
        warmup: untimed calls made first.
        threads: ``torch.get_num_threads()`` while timing.
    """

    median_s: float
    min_s: float
    max_s: float
    runs: int
    warmup: int
    threads: int

    @property
    def spread(self) -> float:
        """(max - min) / median; BENCHMARKING.md asks for min/max when it exceeds 10%."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s > 0 else 0.0

    def fmt(self) -> str:
        """``"12.3 ms"``, with ``" (11.9-15.0)"`` appended when the runs spread more than 10%."""
        text = f"{self.median_s * 1e3:.2f} ms"
        if self.spread > 0.10:
            text += f" ({self.min_s * 1e3:.2f}-{self.max_s * 1e3:.2f})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads and return the value torch reports back."""
    torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    threads: int | None = DEFAULT_THREADS,
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed with ``perf_counter``.

    ``threads`` (when not None) is set before timing and restored afterwards.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    previous = torch.get_num_threads()
    used = set_threads(threads) if threads is not None else previous
    try:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return Timing(statistics.median(times), min(times), max(times), runs, warmup, used)


def time_round_robin(
    calls: dict[str, Callable[[], Any]],
    *,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    threads: int | None = DEFAULT_THREADS,
) -> dict[str, Timing]:
    """Time several contenders in interleaved rounds (one call of each per round).

    On a shared, noisy machine a slow spell then hits every contender alike, so their ratios
    stay fair. Each contender is warmed up ``warmup`` times before the first round.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    previous = torch.get_num_threads()
    used = set_threads(threads) if threads is not None else previous
    times: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for fn in calls.values():
            for _ in range(warmup):
                fn()
        for _ in range(runs):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return {
        name: Timing(statistics.median(t), min(t), max(t), runs, warmup, used)
        for name, t in times.items()
    }


def model_call(model: nn.Module, batch: Any) -> Callable[[], None]:
    """A no-argument call of ``model`` on ``batch`` without gradients (for the timers)."""

    def call() -> None:
        # no_grad rather than inference_mode: some peers' tensor subclasses (optimum-quanto
        # qint4) fail on inference tensors
        with torch.no_grad():
            call_model(model, batch)

    return call


def time_model(model: nn.Module, batch: Any, **kwargs: Any) -> Timing:
    """Latency of ``model`` on one input ``batch`` (tensor, tuple or dict) without gradients."""
    return time_fn(model_call(model, batch), **kwargs)
