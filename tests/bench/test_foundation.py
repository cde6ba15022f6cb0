"""The foundation section's timing helper: contenders that fail are findings, not crashes."""

from __future__ import annotations

import torch
from torch import nn

from compactnn.bench.foundation import _time_all


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel for this dtype")


def test_time_all_drops_failing_contenders_and_times_the_rest():
    models = {"ok": nn.Linear(4, 2), "broken": Broken()}
    timed, errors = _time_all(models, torch.randn(8, 4), quick=True)
    assert set(timed) == {"ok"}
    assert timed["ok"]["batch"].runs == 3 and timed["ok"]["one"].runs == 3
    assert errors == ["broken failed when timed: RuntimeError: no kernel for this dtype"]
