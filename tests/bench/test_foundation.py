"""The foundation section's timing helper: contenders that fail are findings, not crashes;
the rest are timed beside the float paths at the throughput batch and at batch 1."""

from __future__ import annotations

import torch
from torch import nn

from compactnn.bench.foundation import _time_all


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel for this dtype")


def test_time_all_drops_failing_contenders_and_times_the_rest_beside_float():
    torch.manual_seed(0)
    models = {"ok": nn.Linear(4, 2), "broken": Broken()}
    paths, errors = _time_all(nn.Linear(4, 2), models, torch.randn(8, 4), quick=True)
    assert errors == ["broken failed when timed: RuntimeError: no kernel for this dtype"]
    for key, batch in (("batch", 8), ("one", 1)):
        timings = paths[key].timings
        assert "ok" in timings and "broken" not in timings
        assert "fp32-eager" in timings and paths[key].winner != "ok"  # extras never win
        assert timings["ok"].runs >= 3 and timings["ok"].batch == batch
