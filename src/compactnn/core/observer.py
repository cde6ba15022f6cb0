"""Activation observers: collect calibration statistics, then produce a range."""

from __future__ import annotations

import torch

from compactnn.core.calib import all_finite
from compactnn.core.qtype import QType
from compactnn.core.ranges import estimate_range
from compactnn.errors import CompactnnError

# Percentile and MSE ranges need samples, not just extremes; a bounded reservoir keeps memory
# flat however much calibration data comes through.
MAX_SAMPLES = 1 << 18


class NonFiniteActivation(CompactnnError):
    """An observed activation holds NaN or Inf (``observer`` says which observer saw it).

    :meth:`compactnn.core.context.CompressContext.run_all` re-raises it with the batch index
    and the name of the layer whose input it is.
    """

    def __init__(self, message: str, observer: RangeObserver) -> None:
        super().__init__(message)
        self.observer = observer


class RangeObserver:
    """Running min/max plus a bounded, seeded random sample of the values seen."""

    def __init__(self, method: str, keep_samples: bool, seed: int = 0) -> None:
        self.method = method
        self.keep_samples = keep_samples
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.n_samples = 0
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if not all_finite(x):  # one reduction; NaN would poison min/max
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteActivation(
                f"an activation observed during calibration holds {bad} NaN/Inf value(s) of "
                f"{x.numel()}: the inputs overflow float32 inside the model (scale them to "
                "the range the model was trained on) or the model itself produces NaN.",
                self,
            )
        lo, hi = x.min(), x.max()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.keep_samples and self.n_samples < MAX_SAMPLES:
            take = min(x.numel(), MAX_SAMPLES - self.n_samples, MAX_SAMPLES // 8)
            idx = torch.randint(0, x.numel(), (take,), generator=self.gen)
            self.samples.append(x[idx].cpu())
            self.n_samples += take

    @property
    def collapsed(self) -> bool:
        """Whether every value seen was the same (a zero-width range)."""
        return self.min is not None and bool(self.min == self.max)

    def range(
        self, qtype: QType, symmetric: bool, percentile: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min is None:
            raise RuntimeError("observer saw no data")
        if self.method == "minmax" or not self.samples:
            return self.min.reshape(1, 1), self.max.reshape(1, 1)
        data = torch.cat(self.samples).reshape(1, 1, -1)
        lo, hi = estimate_range(data, self.method, qtype, symmetric, percentile)
        # samples never include the extremes for sure; for percentile keep inside the seen range
        return lo.clamp(min=self.min), hi.clamp(max=self.max)
