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


def test_layers_without_a_kernel_are_listed_simulated_with_the_reason():
    """A quantized conv (a ViT patch embedding) has no kernel: to_kernels keeps it simulated,
    lists it with its reason and says so, so reports count it."""
    from compactnn.core.qlayers import is_quant_layer

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 32, 4, stride=4), nn.Flatten(), nn.Linear(32 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    ).eval()  # fmt: skip
    calib = [torch.randn(4, 4, 8, 8) for _ in range(2)]
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    convs = [n for n, m in q.named_modules() if is_quant_layer(m) and "Conv" in type(m).__name__]
    assert convs == ["0"]
    with pytest.warns(UserWarning, match=r"1 quantized layer\(s\) have no kernel.*\(0\)"):
        fast = compactnn.to_kernels(q)
    info = fast._compactnn_kernels
    assert info["simulated"] == ["0"] and "QuantConv2d" in info["simulated_why"]["0"]
    assert set(info["swapped"]) == {"2", "4"}
    with torch.no_grad():  # numerics unchanged: bfloat16 model close to the simulation
        ref, got = q(calib[0]), fast(calib[0])
    assert float((got - ref).norm() / ref.norm()) < 0.05
