"""What a reference model hands to the demo, the benchmarks and the tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn


@dataclasses.dataclass
class Reference:
    """A trained float model with its calibration data and its quality measure.

    Attributes:
        name: the reference's name (``"mnist-cnn"``).
        model: the float model, in eval mode.
        calib: calibration batches, drawn from the training split only.
        evaluate: ``evaluate(model) -> float``: quality on held-out data, higher is better
            except for ``"perplexity"``. Works on the float model and on compressed copies.
        metric: ``"top1"`` (percent correct), ``"cosine"`` (mean cosine vs the float model)
            or ``"perplexity"`` (per byte on held-out text; lower is better).
        example: one input batch (a tensor, or a dict of tensors) for latency measurements.
        kind: ``"cnn"`` or ``"transformer"``.
        skeleton: builds a fresh float model of the same architecture (for ``load``).
    """

    name: str
    model: nn.Module
    calib: list
    evaluate: Callable[[nn.Module], float]
    metric: str
    example: object
    kind: str
    skeleton: Callable[[], nn.Module]
