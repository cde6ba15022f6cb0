"""Measurements the library and its CLI use: size on disk, theoretical size, per-layer
formats, output fidelity against the float model, quality on labelled data (``evaluate``),
and latency with explicit threads.

Below the CLI, the demo and the benchmarks (which all import from here); depends on
``core``, ``export`` and ``training.data`` (the labelled-data forms ``evaluate`` shares with
``compactnn.train``).

Example:
    >>> from compactnn.measure import time_fn
    >>> time_fn(lambda: None, warmup=0, runs=3, threads=1).runs
    3
"""

from compactnn._submodules import submodule
from compactnn.measure.fidelity import first_rows, fmt_quality, output_fidelity
from compactnn.measure.quality import evaluate
from compactnn.measure.size import (
    artifact_bytes,
    float_artifact_bytes,
    float_weight_layers,
    layer_formats,
    theoretical_bytes,
)
from compactnn.measure.timing import (
    DEFAULT_RUNS,
    DEFAULT_THREADS,
    DEFAULT_WARMUP,
    Timing,
    TimingWarning,
    model_call,
    set_threads,
    time_blocks,
    time_fn,
    time_model,
    time_round_robin,
)

__all__ = [
    "DEFAULT_RUNS",
    "DEFAULT_THREADS",
    "DEFAULT_WARMUP",
    "Timing",
    "TimingWarning",
    "artifact_bytes",
    "evaluate",
    "first_rows",
    "float_artifact_bytes",
    "float_weight_layers",
    "fmt_quality",
    "layer_formats",
    "model_call",
    "output_fidelity",
    "set_threads",
    "theoretical_bytes",
    "time_blocks",
    "time_fn",
    "time_model",
    "time_round_robin",
]


def __getattr__(name: str) -> object:
    """``compactnn.measure.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
