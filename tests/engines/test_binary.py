import pytest
import torch
from torch import nn

import compactnn
from compactnn.engines.binary import (
    BinaryBlock,
    BinaryWeight,
    RPReLU,
    approx_sign,
    binary_weight,
    check_binary_layer,
    real_shortcut,
    rebuild_blocks,
    sign_pm1,
    sign_ste,
    xnor_scale,
)
from compactnn.errors import CompactnnError


def rprelu_reference(y: torch.Tensor, gamma, zeta, slope) -> torch.Tensor:
    """RPReLU through ``F.prelu`` (channels on dim 1): the reference."""
    view = (1, -1, *[1] * (y.dim() - 2))
    return nn.functional.prelu(y - gamma.reshape(view), slope) + zeta.reshape(view)


def test_sign_of_zero_is_plus_one_and_gradient_is_clipped_ste():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5], requires_grad=True)
    out = sign_ste(x)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_binary_weight_uses_per_filter_mean_magnitude():
    w = torch.tensor([[0.5, -1.5], [0.2, 0.0]])
    out = binary_weight(w)
    alpha = torch.tensor(0.1).half().float()  # stored as float16, as in the artifact
    assert torch.equal(out, torch.stack([torch.tensor([1.0, -1.0]), alpha.repeat(2)]))
    exp = BinaryWeight().export(w)
    levels = exp.levels.reshape(2, 2)
    decoded = torch.gather(levels, 1, exp.codes.long())
    assert torch.equal(decoded, out.half().float()) and exp.spec.bits == 1  # fp16 levels


def test_activation_scale_k_is_box_filtered_channel_mean():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=1, padding=1)
    x = torch.randn(2, 3, 5, 5)
    k = xnor_scale(x, conv)
    a = torch.nn.functional.pad(x.abs().mean(1), (1, 1, 1, 1))  # (2, 7, 7)
    ref = torch.stack(
        [
            torch.stack([a[:, i : i + 3, j : j + 3].mean((1, 2)) for j in range(5)], -1)
            for i in range(5)
        ],
        -2,
    )  # (2, 5, 5)
    assert torch.allclose(k[:, 0], ref, atol=1e-6)
    assert sign_pm1(torch.zeros(1)).item() == 1.0


def test_two_stage_weights_stay_real_for_the_first_epochs():
    w = torch.tensor([[0.5, -1.5], [0.2, 0.0]])
    q = BinaryWeight(real_epochs=2)
    assert torch.equal(q(w), binary_weight(w))  # outside train(): binary
    seen = []
    for epoch in range(4):
        q.start_epoch(w, epoch, 4)
        seen.append(torch.equal(q(w), w))
    assert seen == [True, True, False, False]
    q.start_epoch(w, 0, 1)  # a one-epoch run still trains binary weights
    assert torch.equal(q(w), binary_weight(w))


def polynomial_sign(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real's F(x), written piecewise as in the paper."""
    return torch.where(
        x < -1,
        -torch.ones_like(x),
        torch.where(x < 0, 2 * x + x * x, torch.where(x < 1, 2 * x - x * x, torch.ones_like(x))),
    )


def test_forward_is_sign_and_gradient_is_the_polynomial_derivative():
    x = torch.tensor([-1.5, -0.75, -0.25, 0.0, 0.3, 0.9, 2.0], requires_grad=True)
    out = approx_sign(x)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]))
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    polynomial_sign(x2).sum().backward()  # autograd of F: the reference
    assert torch.allclose(x.grad, x2.grad)
    assert torch.allclose(x.grad, torch.tensor([0.0, 0.5, 1.5, 2.0, 1.4, 0.2, 0.0]))


def test_rprelu_matches_shifted_prelu():
    torch.manual_seed(0)
    m = RPReLU(3)
    with torch.no_grad():
        m.gamma.copy_(torch.tensor([0.1, -0.2, 0.3]))
        m.zeta.copy_(torch.tensor([0.5, 0.0, -0.5]))
        m.slope.copy_(torch.tensor([0.1, 0.25, 0.5]))
    y = torch.randn(2, 3, 4, 4)
    assert torch.allclose(m(y), rprelu_reference(y, m.gamma, m.zeta, m.slope))
    assert torch.allclose(m(torch.full((1, 3, 1, 1), 0.1)).flatten()[0], torch.tensor(0.5))


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


def test_recalibrated_norm_statistics_are_the_exact_average_over_the_batches():
    from compactnn.engines.binary import recalibrate_norms

    torch.manual_seed(0)
    block = BinaryBlock(nn.Conv2d(4, 8, 3, padding=1, bias=False), "bireal", BinaryWeight())
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), block)
    xs = [torch.randn(16, 3, 5, 5) for _ in range(3)]
    block.start_observing()
    model(xs[0])
    block.finish_observing()
    model.train()
    for x in xs:  # exponential running statistics, far from the final ones
        model(2 * x + 1)
    before = model[0].weight.clone(), block.gain.clone()
    assert recalibrate_norms(model, iter(xs)) == 1
    assert model.training and block.norm.momentum == 0.1  # mode and momentum kept
    with torch.no_grad():  # by hand: per channel, the mean over batches of batch statistics
        raws = [block._raw(model[1](model[0](x))).transpose(0, 1).reshape(8, -1) for x in xs]
    mean = torch.stack([r.mean(1) for r in raws]).mean(0)
    var = torch.stack([r.var(1) for r in raws]).mean(0)  # unbiased, as BatchNorm keeps it
    assert torch.allclose(block.norm.running_mean, mean, atol=1e-5)
    assert torch.allclose(block.norm.running_var, var, atol=1e-4)
    assert torch.equal(model[0].weight, before[0]) and torch.equal(block.gain, before[1])
    kept = block.norm.running_mean.clone()
    assert recalibrate_norms(model, iter([])) == 1  # no batches: statistics kept
    assert torch.equal(block.norm.running_mean, kept)
    assert recalibrate_norms(nn.Linear(2, 2), iter(xs)) == 0  # no binary block


@pytest.mark.parametrize("key", ["min_steps", "warmup_steps", "recalibrate_batches"])
def test_binary_schedule_options_must_be_non_negative_integers(key):
    from compactnn.quant.xnor import XNORConfig

    for bad in (-1, 1.5, True):
        with pytest.raises(CompactnnError, match=key):
            XNORConfig(**{key: bad})
