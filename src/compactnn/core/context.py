"""What a method handler gets beside the model: calibration batches and bookkeeping."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compactnn.core.calib import Batch, batch_size_of, call_model
from compactnn.errors import CompactnnError


@dataclass
class CompressContext:
    """Shared state of one :func:`compactnn.compress` call.

    Attributes:
        batches: calibration batches (possibly empty).
        call_mode: how a tuple batch is passed to the model (see ``call_model``).
        seed: seed for every stochastic method.
        progress: show progress bars.
        float_layers: weight layers left in float, with the reason (reported).
        folded_bn: batch-norm modules folded into their convs (needed to load).
        notes: messages for the report (fallbacks, clamps).
    """

    batches: list[Batch] = field(default_factory=list)
    call_mode: str = "auto"
    seed: int = 0
    progress: bool = True
    float_layers: dict[str, str] = field(default_factory=dict)
    folded_bn: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(batch_size_of(b) for b in self.batches)

    def run(self, model: nn.Module, batch: Batch) -> Any:
        return call_model(model, batch, self.call_mode)

    def run_all(self, model: nn.Module, desc: str | None = None) -> None:
        """Run every calibration batch through ``model`` without gradients."""
        with torch.no_grad():
            for b in self.bar(self.batches, desc=desc, leave=False):
                self.run(model, b)

    def bar(self, iterable, **kwargs):
        return tqdm(iterable, disable=not self.progress or not kwargs.get("desc"), **kwargs)

    def require_calibration(self, method: str, recommended: int) -> None:
        """Fail without data; warn when fewer samples than ``recommended`` are given."""
        if not self.batches:
            raise CompactnnError(
                f"{method} needs calibration data: pass calib_data= (a tensor of inputs or an "
                f"iterable of batches; about {recommended} samples are recommended)."
            )
        n = self.num_samples
        if n < recommended:
            self.warn(
                f"{method}: only {n} calibration samples were given; {recommended} or more are "
                "recommended for a stable result."
            )

    def warn(self, message: str) -> None:
        self.notes.append(message)
        warnings.warn(message, stacklevel=3)
