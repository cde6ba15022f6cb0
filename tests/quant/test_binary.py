import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.quant.binary import BinaryBlock, check_binary_layer, real_shortcut, rebuild_blocks
from compactnn.quant.xnor import BinaryWeight


def test_real_shortcut_pools_and_matches_channels():
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    more = real_shortcut(x, torch.zeros(2, 4, 2, 2), conv=True)
    pooled = nn.functional.avg_pool2d(x, 2)
    assert torch.equal(more[:, 0], pooled[:, 0]) and torch.equal(more[:, 1], pooled[:, 0])
    fewer = real_shortcut(x, torch.zeros(2, 1, 4, 4), conv=True)
    assert torch.equal(fewer[:, 0], x.mean(1))


def test_block_init_matches_float_statistics_and_trains():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.relu(torch.randn(32, 4, 6, 6))
    for kind in ("xnor", "bireal", "reactnet"):
        block = BinaryBlock(nn.Conv2d(4, 8, 3, padding=1), kind, BinaryWeight())
        block.layer.load_state_dict(conv.state_dict())
        block.start_observing()
        y_float = block(x)
        block.finish_observing()
        assert torch.allclose(block.shift, x.mean((0, 2, 3)), atol=1e-5)
        y = block(x)
        assert y.shape == y_float.shape
        if kind != "reactnet":  # RPReLU reshapes the negative side
            assert torch.allclose(y.mean((0, 2, 3)), y_float.mean((0, 2, 3)), atol=1e-4)
        y.sum().backward()
        assert block.layer.weight.grad is not None and block.gain.grad is not None


def test_binary_codebook_artifact_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(16, 6)
    q = compactnn.compress(model, "w1a1-bireal", calib_data=x, progress=False)
    assert isinstance(q[2], BinaryBlock) and q[2].shortcut
    compactnn.save(q, tmp_path / "b")
    skeleton = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    q2 = compactnn.load(tmp_path / "b", model=skeleton)
    assert torch.equal(q(x), q2(x))
    assert q2[2].layer.weight_codes.unique().tolist() == [0, 1]
    rebuild_blocks(skeleton, {"binary_blocks": {"2": "bireal"}})
    assert isinstance(skeleton[2], BinaryBlock)


def test_layers_that_cannot_take_binary_activations():
    with pytest.raises(CompactnnError, match=r"'m' \(Conv1d\)"):
        check_binary_layer("m", nn.Conv1d(2, 2, 3))
    with pytest.raises(CompactnnError, match=r"'p'.*padding"):
        check_binary_layer("p", nn.Conv2d(2, 2, 3, padding="same"))
    check_binary_layer("ok", nn.Conv2d(2, 2, 3, padding=1))


@pytest.mark.parametrize("kind", ["xnor", "bireal", "reactnet"])
@pytest.mark.parametrize("conv", [True, False])
def test_freezing_folds_the_batch_norm_into_scale_and_bias(kind, conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 8, 3, padding=1, bias=False) if conv else nn.Linear(6, 6, bias=False)
    x = torch.relu(torch.randn(32, 4, 6, 6) if conv else torch.randn(32, 6))
    block = BinaryBlock(layer, kind, BinaryWeight())
    assert block.norm is not None and layer.bias is not None  # a bias to fold the shift into
    block.start_observing()
    block(x)
    block.finish_observing()
    block.train()
    for _ in range(3):  # running statistics move away from their initial values
        block(x + 0.1 * torch.randn_like(x))
    block.eval()
    expected = block(x)
    mean, var = block.norm.running_mean.clone(), block.norm.running_var.clone()
    with torch.no_grad():  # the same eval output by hand: (raw - mean) / sqrt(var + eps)
        raw = block._raw(x)
        view = (1, -1, 1, 1) if conv else (1, -1)
        by_hand = (raw - mean.reshape(view)) / torch.sqrt(var.reshape(view) + 1e-5)
        by_hand = by_hand * (block.gain * block.scale).reshape(view) + layer.bias.reshape(view)
        if block.shortcut:
            by_hand = by_hand + real_shortcut(x, by_hand, conv)
        if block.post is not None:
            by_hand = block.post(by_hand)
    assert torch.allclose(expected, by_hand, atol=1e-5)
    block.fold_norm()
    assert block.norm is None
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_rebuilt_blocks_have_no_batch_norm():
    assert BinaryBlock(nn.Linear(4, 4), "bireal").norm is None  # loading: already folded
