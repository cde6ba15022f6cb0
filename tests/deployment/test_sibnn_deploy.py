"""Binary blocks with {0,1} activations (``w1a1-sibnn``) on the integer kernels: the int8
kernel reads ``a = 1[x - shift >= 0]`` as codes ``128 + a`` (zero point 128, padding 0), the
float kernel as 0.0 / 1.0; both against the simulated block, and popcount refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactnn.deployment.binary import DeployedBinaryBlock, lower_binary_blocks
from compactnn.engines.binary import BinaryBlock, BinaryWeight
from compactnn.errors import CompactnnError
from compactnn.quant.sibnn import SparseAct


def sibnn_block(layer: nn.Module, conv: bool, seed: int = 0) -> BinaryBlock:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    channels = layer.in_channels if conv else layer.in_features
    b = BinaryBlock(layer, "xnor", BinaryWeight(), act=SparseAct(channels, conv))
    with torch.no_grad():
        b.shift.copy_(torch.randn(b.shift.shape, generator=g) * 0.3)
        b.gain.copy_(torch.rand(b.gain.shape, generator=g) + 0.5)
        b.layer.bias.copy_(torch.randn(b.layer.bias.shape, generator=g))
    b.act.ready.fill_(True)
    return b.eval().freeze().requires_grad_(False)


@pytest.mark.parametrize("kernel", ["int8", "float"])
@pytest.mark.parametrize(
    "layer,xshape",
    [(nn.Conv2d(16, 32, 3, 1, 1), (2, 16, 7, 7)), (nn.Conv2d(8, 8, 3, 2, 1), (1, 8, 9, 9)),
     (nn.Linear(24, 10), (3, 24))],
)  # fmt: skip
def test_zero_one_block_matches_its_simulation(kernel, layer, xshape):
    conv = isinstance(layer, nn.Conv2d)
    block = sibnn_block(layer, conv)
    x = torch.randn(xshape, generator=torch.Generator().manual_seed(1))
    if conv:  # inputs exactly on the threshold count as a = 1
        x[:, :, 0, :] = block.shift.view(1, -1, 1)
    deployed = DeployedBinaryBlock(block, kernel)
    with torch.no_grad():
        ref, got = block(x), deployed(x)
        # the +-1 reading of the same block (what deploy computed before): far off
        pm1 = DeployedBinaryBlock(block, kernel)
        pm1.zero_one = False
        if pm1.kernel == "float":
            pm1.core.low = -1.0
        wrong = pm1(x)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 1e-5 * scale
    assert float((wrong - ref).abs().max()) > 0.05 * scale


def test_popcount_is_refused_and_auto_skips_it():
    block = sibnn_block(nn.Conv2d(8, 8, 3, 1, 1), True)
    with pytest.raises(CompactnnError, match="popcount"):
        DeployedBinaryBlock(block, "popcount")
    model = nn.Sequential(block, nn.ReLU())
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(2))
    fast = lower_binary_blocks(model, "auto", example=x)  # verified per block inside
    assert fast.binary_kernels["0"]["kernel"] in ("int8", "float")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,size", [((3, 16, 28, 28), (14, 14)), ((2, 8, 9, 12), (3, 4)),
                                        ((2, 8, 9, 9), (4, 4))])  # fmt: skip
def test_shortcut_pool_equals_the_adaptive_pool(shape, size):
    from torch.nn import functional as F

    from compactnn.deployment.binary import _pool_to

    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(_pool_to(t, size), F.adaptive_avg_pool2d(t, size))
