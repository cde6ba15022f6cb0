import numpy as np
import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.mixed_precision import Budget, search
from compactnn.mixed_precision.latency import latency_table


def test_table_splits_each_format_by_mac_share():
    table = latency_table({"w2a8": 3.0, "w8a8": 6.0}, ["w2a8", "w8a8"], [100, 300, 600])
    np.testing.assert_allclose(table, [[0.3, 0.6], [0.9, 1.8], [1.8, 3.6]])
    np.testing.assert_allclose(table.sum(axis=0), [3.0, 6.0])  # uniform: the measured time
    with pytest.raises(CompactnnError, match="zero MACs"):
        latency_table({"a": 1.0}, ["a"], [0, 0])


def test_latency_budget_refuses_weight_only_formats():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 8)
    with pytest.raises(CompactnnError, match="weight-only: w2, w4"):
        search(
            model,
            formats="w2,w4",
            budget=Budget(max_latency_ratio=0.8),
            calib_data=x,
            latency_example=x,
            progress=False,
        )
    with pytest.raises(CompactnnError, match="latency_example"):
        search(
            model,
            formats="w2a8,w4a8",
            budget=Budget(max_latency_ratio=0.8),
            calib_data=x,
            progress=False,
        )
