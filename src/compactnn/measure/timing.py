"""Latency: explicit threads, warm-up, then the median of >= 10 timed runs (BENCHMARKING.md).

Every :class:`Timing` also records what makes a time trustworthy on a shared machine: the
torch threads, the batch size (when known), the OpenMP wait policy, the 1-minute load
average and the process CPU time per call beside the wall time. :func:`suspect_reasons`
turns those into plain reasons a number may be inflated, and the timers warn with them.

Example:
    >>> t = time_fn(lambda: sum(range(1000)), warmup=2, runs=10, threads=1)
    >>> t.runs
    10
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import batch_size_of, call_model
from compactnn.errors import user_stacklevel
from compactnn.measure.sub_ms import (  # noqa: F401 (re-exported: the rules under 1 ms)
    MAX_BLOCK_SPREAD,
    MAX_MEDIAN_OVER_MIN,
    MIN_JUDGED_S,
    sub_ms_reasons,
)
from compactnn.omp_policy import (  # omp_wait_policy / spin_count: read here by callers
    PASSIVE_SPINCOUNT,
    load_average,
    omp_wait_policy,
    spin_count,
    spin_helps,
)

DEFAULT_THREADS = 2
DEFAULT_WARMUP = 3
DEFAULT_RUNS = 10
DEFAULT_ROUNDS = 3  # rounds of blocks, each in a rotated order (BENCHMARKING.md)
DEFAULT_PAUSE_S = 0.05  # before each block: lets other runtimes' idle threads go to sleep
MAX_BLOCK_CALLS = 30  # a block grown to ``block_s`` holds at most this many calls
MAX_SPREAD = 0.5  # (max - min) / median above this: the runs disagree, the median is noise
MIN_CPU_SHARE = 0.5  # process CPU per call below this share of the median wall time: it waited
MAX_CPU_OVER_THREADS = 1.5  # CPU per call above median wall x threads x this: other pools ran
# a call under MIN_JUDGED_S (1 ms) is judged by compactnn.measure.sub_ms instead


def ms_text(seconds: float, decimals: int = 2) -> str:
    """``seconds`` in milliseconds, without the unit: ``decimals`` decimals from 1 ms up, 3
    significant digits below (``0.09 ms`` / ``0.10 ms`` would hide a 0.83x speedup).

    Example:
        >>> ms_text(0.0029207), ms_text(8.6258e-05), ms_text(1.0332e-4), ms_text(0.0153, 1)
        ('2.92', '0.0863', '0.103', '15.3')
    """
    value = seconds * 1e3
    return f"{value:.{decimals}f}" if value >= 1 or value <= 0 else f"{value:#.3g}"


class TimingWarning(UserWarning):
    """A latency that may not be the model's: the machine or the setup inflated it."""


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in seconds, and the conditions they were taken in.

    Attributes:
        median_s: median over the timed runs (the number to quote).
        min_s: fastest run.
        max_s: slowest run.
        runs: timed runs (after ``warmup`` untimed calls).
        warmup: untimed calls made first.
        threads: ``torch.get_num_threads()`` while timing.
        batch: samples per call, when known (None otherwise).
        omp_wait_policy: ``OMP_WAIT_POLICY`` of the process (``""``: not set, OpenMP's
            default, which spins).
        load_avg: the machine's 1-minute load average after timing (None where unknown).
        cpu_s: process CPU time (all threads) per timed call: each block's CPU time over
            its calls, median of the blocks.
        cpus: CPUs of the machine (``os.cpu_count()``).
        cpu_share: ``cpu_s / median_s``, the cores a call kept busy against the latency
            quoted (below ``MIN_CPU_SHARE`` the call waited for the CPU; a few stalled calls
            move the spread, not this). Set from those two whenever ``cpu_s`` is known, so a
            record never contradicts itself; given alone, it is kept.
        block_medians_s: the median wall time of each block of calls, in the order run
            (judges a call under 1 ms, :func:`suspect_reasons`; empty where not recorded).
    """

    median_s: float
    min_s: float
    max_s: float
    runs: int
    warmup: int
    threads: int
    batch: int | None = None
    omp_wait_policy: str = ""
    load_avg: float | None = None
    cpu_s: float | None = None
    cpus: int | None = field(default_factory=os.cpu_count)
    cpu_share: float | None = None
    block_medians_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.cpu_s is not None and self.median_s > 0:  # frozen: set through object
            object.__setattr__(self, "cpu_share", self.cpu_s / self.median_s)

    @property
    def spread(self) -> float:
        """(max - min) / median; BENCHMARKING.md asks for min/max when it exceeds 10%."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s > 0 else 0.0

    def fmt(self) -> str:
        """``"12.30 ms"``, with ``" (11.90-15.00)"`` appended when the runs spread more than
        10%; below 1 ms, 3 significant digits (``"0.0863 ms"``), so ratios can be recomputed."""

        text = f"{ms_text(self.median_s)} ms"
        if self.spread > 0.10:
            text += f" ({ms_text(self.min_s)}-{ms_text(self.max_s)})"
        return text

    def conditions(self) -> str:
        """``"2 threads, batch 8, OMP_WAIT_POLICY=PASSIVE, load 3.1 on 2 CPUs, CPU 1.8 ms/call"``
        (the conditions a latency was measured in)."""
        parts = [f"{self.threads} threads"]
        if self.batch is not None:
            parts.append(f"batch {self.batch}")
        parts.append(f"OMP_WAIT_POLICY={self.omp_wait_policy or 'unset'}")
        if spin_count():
            parts.append(f"GOMP_SPINCOUNT={spin_count()}")
        if self.load_avg is not None:
            parts.append(f"load {self.load_avg:.1f} on {self.cpus} CPUs")
        if self.cpu_s is not None:
            parts.append(f"CPU {ms_text(self.cpu_s)} ms/call")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"suspect": suspect_reasons(self)}


def suspect_reasons(t: Timing) -> list[str]:
    """Why ``t`` may not be the model's own speed (empty when nothing looks wrong).

    A call under ``MIN_JUDGED_S`` (1 ms) is judged by two rules of its own
    (:func:`compactnn.measure.sub_ms.sub_ms_reasons`:
    the median more than ``MAX_MEDIAN_OVER_MIN`` (20%) above the fastest call, or the block
    medians more than ``MAX_BLOCK_SPREAD`` (25%) apart): one preempted call spreads its runs
    without moving the median, and idle pool threads waking up are part of its wall time.
    A longer call is judged by three rules, each a plain physical argument:

    * the runs spread more than ``MAX_SPREAD`` (50%) around the median: something else ran
      during some of them, so the median depends on luck;
    * the process's CPU time per call is less than ``MIN_CPU_SHARE`` (half) of the median
      wall time (``cpu_share``): a compute-bound model keeps at least one core busy, so the
      call waited for the CPU (a loaded machine) rather than computed;
    * its CPU time per call is more than ``MAX_CPU_OVER_THREADS`` x ``threads`` times the
      median wall time: a thread pool beside torch's (ONNX Runtime, a second OpenMP runtime,
      spinning waiters) competed with the threads being timed.

    The CPU reasons print the CPU time and the median wall time they divide.

    Example:
        >>> suspect_reasons(Timing(0.01, 0.01, 0.01, 10, 2, 2, cpu_s=0.001, cpu_share=0.1))[0][:22]
        'CPU time 1.00 ms/call '
    """
    if t.median_s < MIN_JUDGED_S:
        return sub_ms_reasons(t.median_s, t.min_s, t.block_medians_s)
    reasons: list[str] = []
    if t.spread > MAX_SPREAD:
        reasons.append(
            f"runs spread {t.spread:.0%} around the median ({ms_text(t.min_s)}-"
            f"{ms_text(t.max_s)} ms): something else ran during some of them"
        )
    if t.cpu_s is not None and t.cpu_share is not None:
        share = t.cpu_share
        if share < MIN_CPU_SHARE:
            reasons.append(
                f"CPU time {ms_text(t.cpu_s)} ms/call is {share:.0%} of the median wall time "
                f"({ms_text(t.median_s)} ms): the call waited for the CPU (load "
                f"{'unknown' if t.load_avg is None else f'{t.load_avg:.1f}'} on {t.cpus} CPUs)"
            )
        elif share > MAX_CPU_OVER_THREADS * max(t.threads, 1):
            reasons.append(
                f"CPU time {ms_text(t.cpu_s)} ms/call over a median wall time of "
                f"{ms_text(t.median_s)} ms is {share:.1f} cores for {t.threads} torch "
                "threads: another thread pool competed with them"
            )
    return reasons


_warned: set[tuple[str, str]] = set()
_quiet = 0  # > 0 inside quiet_timing(): timing warnings neither shown nor counted as said
_owners: list[tuple[str, str]] = []  # timing_owner()'s (owner, occasion), innermost last


def _warn_once(key: tuple[str, str], message: str) -> None:
    if _quiet or key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, TimingWarning, stacklevel=user_stacklevel())


@contextlib.contextmanager
def timing_owner(owner: str, occasion: str = "") -> Iterator[None]:
    """Name ``owner`` (the model or row the timings inside are taken for) in their warnings,
    with the ``occasion`` when given: ``latency of ch50-ft's fp32-eager (the short race that
    picks its float path) may be inflated: ...``, never a bare ``fp32-eager`` that reads as
    the float model's. The innermost owner names a timing."""
    _owners.append((owner, occasion))
    try:
        yield
    finally:
        _owners.pop()


def warning_label(label: str) -> str:
    """``label`` as the warnings name it: with the innermost :func:`timing_owner`'s owner
    and occasion, else as it is.

    Example:
        >>> with timing_owner("ch50-ft", "its own race"):
        ...     warning_label("fp32-eager")
        "ch50-ft's fp32-eager (its own race)"
        >>> warning_label("fp32-eager")
        'fp32-eager'
    """
    if not _owners:
        return label
    owner, occasion = _owners[-1]
    return f"{owner}'s {label}" + (f" ({occasion})" if occasion else "")


@contextlib.contextmanager
def quiet_timing() -> Iterator[None]:
    """Time without the timing warnings (each text said once): none is shown inside, and
    none counts as said, so a later timing of the same contender (the one a user sees) still
    warns (a backend race timed apart from the table it picks for)."""
    global _quiet
    _quiet += 1
    try:
        yield
    finally:
        _quiet -= 1


def check_environment(load: float | None = None) -> str | None:
    """Warn once per process (and return the text; None when the settings suit the load) when
    OpenMP threads spin on a machine loaded past its CPU count (no policy, ACTIVE, or a nonzero
    ``GOMP_SPINCOUNT``), or a bare PASSIVE sleeps at once where the spin helps (:func:`spin_helps`).
    """
    load = load_average() if load is None else load
    cpus = os.cpu_count() or 1
    passive = omp_wait_policy() == "PASSIVE"
    if passive and not spin_count() and torch.get_num_threads() > 1 and spin_helps(load, cpus):
        key = "spin"
        message = (
            f"OMP_WAIT_POLICY=PASSIVE without GOMP_SPINCOUNT at load {load:.1f} on {cpus} "
            "CPUs: OpenMP's idle threads sleep after every parallel region and a small model "
            "on several threads can run slower than on one (mnist-cnn, batch 16, 2 threads: "
            f"0.99 against 0.50 ms deployed). Set GOMP_SPINCOUNT={PASSIVE_SPINCOUNT} as well "
            "while the load stays below the CPU count (the compactnn command does)."
        )
    elif load is not None and load > cpus and (not passive or spin_count() not in ("", "0")):
        key = "policy"
        what = f"GOMP_SPINCOUNT is {spin_count()}" if passive else "OMP_WAIT_POLICY is "
        message = (
            f"{what}{'' if passive else omp_wait_policy() or 'unset'} on a machine whose load "
            f"({load:.1f}) exceeds its {cpus} CPUs: OpenMP threads that spin while waiting "
            "slow each other down (eager float 10-100x with 20,000 spins), so latencies are "
            "inflated. Start Python with OMP_WAIT_POLICY=PASSIVE and no GOMP_SPINCOUNT (the "
            "compactnn command sets them unless you did)."
        )
    else:
        return None
    _warn_once((key, ""), message)
    return message


def timing_suspect(*latencies: dict[str, Any] | None) -> bool:
    """Whether any of these ``Timing.to_dict()`` records carries suspect reasons.

    Example:
        >>> timing_suspect({"suspect": []}, {"suspect": ["runs spread 60%"]}), timing_suspect(None)
        (True, False)
    """
    return any(bool((t or {}).get("suspect")) for t in latencies)


SUSPECT_MARK = " *"  # after a latency or speedup cell whose timing looked inflated


def suspect_mark(*latencies: dict[str, Any] | None) -> str:
    """:data:`SUSPECT_MARK` when any of these ``Timing.to_dict()`` records has suspect
    reasons (:func:`suspect_reasons`), else ``""``.

    Example:
        >>> suspect_mark({"suspect": []}), suspect_mark({"suspect": []}, {"suspect": ["busy"]})
        ('', ' *')
    """
    return SUSPECT_MARK if timing_suspect(*latencies) else ""


def _warn_suspect(t: Timing, label: str) -> None:
    """Warn each reason ``t`` looks inflated, naming it (:func:`warning_label`); only a text
    said before is dropped, so two timings under one label (a row's own race, then the
    float model's path) each warn with their own numbers."""
    for reason in suspect_reasons(t):
        message = f"latency of {warning_label(label)} may be inflated: {reason}"
        _warn_once(("latency", message), message)


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads and return the value torch reports back."""
    torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def _timing(
    times: list[float],
    cpu: list[tuple[float, float, float]],
    warmup: int,
    threads: int,
    batch: int | None,
) -> Timing:
    return Timing(
        statistics.median(times),
        min(times),
        max(times),
        len(times),
        warmup,
        threads,
        batch=batch,
        omp_wait_policy=omp_wait_policy(),
        load_avg=load_average(),
        cpu_s=statistics.median(c for c, _, _ in cpu) if cpu else None,  # cpu_share from it
        block_medians_s=tuple(block for _, _, block in cpu),
    )


def _block(
    fn: Callable[[], Any], n: int, times: list[float], cpu: list[tuple[float, float, float]]
) -> None:
    """``n`` timed calls of ``fn``; wall times into ``times``, and into ``cpu`` the block's
    (process CPU per call, CPU / its wall time, median wall time per call) triple (the
    middle one is the block's own; a ``Timing``'s ``cpu_share`` is over its median)."""
    start = len(times)
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    used = time.process_time() - c0
    wall = sum(times[start:])
    cpu.append((used / n, used / wall if wall > 0 else 0.0, statistics.median(times[start:])))


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    threads: int | None = DEFAULT_THREADS,
    batch: int | None = None,
    label: str = "the call",
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed with ``perf_counter``.

    ``threads`` (when not None) is set before timing and restored afterwards; ``batch``
    (samples per call) is recorded. Warns (:class:`TimingWarning`) when the result looks
    inflated (:func:`suspect_reasons`) or OpenMP spins on an overloaded machine.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    check_environment()
    previous = torch.get_num_threads()
    used = set_threads(threads) if threads is not None else previous
    times: list[float] = []
    cpu: list[tuple[float, float, float]] = []
    try:
        for _ in range(warmup):
            fn()
        _block(fn, runs, times, cpu)
    finally:
        torch.set_num_threads(previous)
    t = _timing(times, cpu, warmup, used, batch)
    _warn_suspect(t, label)
    return t


def time_blocks(
    calls: dict[str, Callable[[], Any]],
    *,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    threads: int | None = DEFAULT_THREADS,
    rounds: int = DEFAULT_ROUNDS,
    pause_s: float = DEFAULT_PAUSE_S,
    batch: int | None = None,
    block_s: float = 0.0,
) -> dict[str, Timing]:
    """Time several contenders side by side with the rotating-block protocol.

    Each contender is warmed up ``warmup`` times, then timed in ``rounds`` rounds; in each
    round every contender runs one block of ``ceil(runs / rounds)`` calls after a pause of
    ``pause_s``, and the order rotates by one from round to round. Blocks rather than single
    interleaved calls: one runtime's spinning threads then cannot starve the next contender,
    and rotation spreads a slow spell of a shared machine over everyone.

    ``block_s`` > 0 grows a fast contender's blocks to about that many seconds (at most
    ``MAX_BLOCK_CALLS`` calls, judged from its last warm-up call), so a model of a few
    milliseconds is timed warm, call after call, rather than one call after each pause (a
    call that first wakes sleeping threads). Its ``runs`` then counts every timed call.

    Example:
        >>> t = time_blocks({"a": lambda: None, "b": lambda: None}, runs=3, threads=1)
        >>> sorted(t), t["a"].runs
        (['a', 'b'], 3)
    """
    if runs < 1 or rounds < 1:
        raise ValueError("runs and rounds must be >= 1")
    check_environment()
    per_block = math.ceil(runs / min(rounds, runs))
    rounds = min(rounds, runs)
    names = list(calls)
    previous = torch.get_num_threads()
    used = set_threads(threads) if threads is not None else previous
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    sizes = dict.fromkeys(names, per_block)
    try:
        for name, fn in calls.items():
            for i in range(warmup):
                t0 = time.perf_counter()
                fn()
                if block_s > 0 and i == warmup - 1:  # the last warm-up call sizes the block
                    fit = int(block_s / max(time.perf_counter() - t0, 1e-6))
                    sizes[name] = max(per_block, min(MAX_BLOCK_CALLS, fit))
        for r in range(rounds):
            shift = r % max(len(names), 1)
            for name in names[shift:] + names[:shift]:
                time.sleep(pause_s)
                _block(calls[name], sizes[name], times[name], cpu[name])
    finally:
        torch.set_num_threads(previous)
    out = {name: _timing(times[name], cpu[name], warmup, used, batch) for name in names}
    for name, t in out.items():
        _warn_suspect(t, name)
    return out


def time_round_robin(
    calls: dict[str, Callable[[], Any]],
    *,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    threads: int | None = DEFAULT_THREADS,
    batch: int | None = None,
) -> dict[str, Timing]:
    """:func:`time_blocks` with its default rounds (an old name, kept for its callers)."""
    return time_blocks(calls, warmup=warmup, runs=runs, threads=threads, batch=batch)


def model_call(model: nn.Module, batch: Any) -> Callable[[], None]:
    """A no-argument call of ``model`` on ``batch`` without gradients (for the timers)."""

    def call() -> None:
        # no_grad rather than inference_mode: some peers' tensor subclasses (optimum-quanto
        # qint4) fail on inference tensors
        with torch.no_grad():
            call_model(model, batch)

    return call


def time_model(model: nn.Module, batch: Any, **kwargs: Any) -> Timing:
    """Latency of ``model`` on one input ``batch`` (tensor, tuple or dict) without gradients.

    The batch size is recorded in the result.
    """
    kwargs.setdefault("batch", _batch_size(batch))
    kwargs.setdefault("label", type(model).__name__)
    return time_fn(model_call(model, batch), **kwargs)


def _batch_size(batch: Any) -> int | None:
    try:
        return batch_size_of(batch)
    except Exception:  # an input whose size cannot be read: the timing still stands
        return None
