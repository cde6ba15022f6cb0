import pytest
import torch
from _ptq_models import images, tiny_mlp, tiny_resnet
from torch import nn

import compactnn
from compactnn.core.context import CompressContext
from compactnn.engines.reconstruct import (
    NotReconstructable,
    beta_at,
    capture,
    find_units,
    init_logits,
    rectified_sigmoid,
)
from compactnn.quant.brecq import BRECQConfig
from compactnn.recipe import Recipe, Step


def test_logits_start_at_the_fractional_part():
    rest = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(rectified_sigmoid(init_logits(rest)), rest, atol=1e-5)


def test_beta_is_none_in_warmup_then_decays_linearly():
    cfg = BRECQConfig(iters=100, warmup=0.2, beta_start=20.0, beta_end=2.0)
    assert beta_at(10, cfg) is None
    assert beta_at(20, cfg) == pytest.approx(20.0)
    assert beta_at(60, cfg) == pytest.approx(11.0)
    assert beta_at(100, cfg) == pytest.approx(2.0)


def test_blocks_are_found_in_execution_order():
    m = tiny_resnet()
    ctx = CompressContext(batches=[images(8)])
    names = ["stem", "block.conv1", "block.conv2", "fc"]
    units = find_units(m, names, BRECQConfig(), ctx, "brecq")
    assert units == [("stem", ["stem"]), ("block", ["block.conv1", "block.conv2"]), ("fc", ["fc"])]
    assert not ctx.notes


def test_sequential_model_falls_back_to_layers_and_says_so():
    m = tiny_mlp()
    ctx = CompressContext(batches=[torch.randn(4, 16)])
    units = find_units(m, ["0", "2", "4"], BRECQConfig(), ctx, "brecq")
    assert units == [("0", ["0"]), ("2", ["2"]), ("4", ["4"])]
    assert "layer by layer" in ctx.notes[0]


def test_capture_holds_one_module_input_for_all_batches():
    m = tiny_resnet()
    x = images(20)
    ctx = CompressContext(batches=list(torch.split(x, 8)))
    got = capture(m, "block", ctx, "input")
    with torch.no_grad():
        want = torch.relu(m.bn(m.stem(x)))
    assert got.shape == (20, 8, 8, 8)
    assert torch.allclose(got, want)


class TwoInputBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x, scale):
        return self.b(torch.relu(self.a(x))) * scale


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TwoInputBlock()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(x, 2.0))


def test_capture_rejects_blocks_with_several_inputs():
    ctx = CompressContext(batches=[torch.randn(4, 16)])
    with pytest.raises(NotReconstructable):
        capture(TwoInputNet().eval(), "block", ctx, "input")


def test_unreconstructable_block_falls_back_to_its_layers():
    torch.manual_seed(0)
    m = TwoInputNet().eval()
    x = torch.randn(64, 16)
    cfg = BRECQConfig.from_short(4, 8, None, iters=50, num_samples=64)
    q = compactnn.compress(m, Recipe("b", (Step("brecq", cfg),)), calib_data=x, progress=False)
    notes = " ".join(compactnn.info_of(q)["notes"])
    assert "block block cannot be reconstructed as a block" in notes
    rtn = compactnn.compress(m, "w4a8-mse", calib_data=x, progress=False)
    assert not torch.equal(q.block.a.weight_codes, rtn.block.a.weight_codes)
