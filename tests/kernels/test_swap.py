"""to_kernels' argument checks (the kernels themselves: test_linear.py, test_load.py)."""

import pytest
import torch
from torch import nn

import compactnn


def test_a_deployed_model_is_refused_saying_it_already_runs_on_kernels():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    q = compactnn.compress(m, "w8a8", calib_data=x, progress=False)
    deployed = compactnn.deploy(q, "onednn", example=x)
    for inplace in (False, True):
        with pytest.raises(compactnn.CompactnnError, match=r"already deployed.*onednn.*compress"):
            compactnn.to_kernels(deployed, inplace=inplace)
