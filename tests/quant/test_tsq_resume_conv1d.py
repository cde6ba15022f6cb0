"""TSQ: Conv1d layers (unfold and Gram against an independent reference, training), exact
resume from a checkpoint at every step, and the message for a bad short name."""

import shutil
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import compactnn
from compactnn.errors import CompactnnError
from compactnn.quant.tsq import GramStats, TSQConfig, conv_padding, tsq_ternary, unfold_inputs


def _patches_1d(x, conv):
    """Reference unfold of a Conv1d input, by hand: pad as the conv pads, then for every
    output position the ``(C_in / groups) * k`` window of each group, channel-major."""
    k, (d,), (s,), g = conv.kernel_size[0], conv.dilation, conv.stride, conv.groups
    if conv.padding == "same":
        total = d * (k - 1)
        pad = (total // 2, total - total // 2)
    elif conv.padding == "valid":
        pad = (0, 0)
    else:
        pad = (conv.padding[0],) * 2
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode)
    n, c, length = xp.shape
    out_len = (length - d * (k - 1) - 1) // s + 1
    cg = c // g
    rows = []  # (groups, N * out_len, cg * k)
    for gi in range(g):
        rg = []
        for b in range(n):
            for p in range(out_len):
                idx = [p * s + j * d for j in range(k)]
                rg.append(xp[b, gi * cg : (gi + 1) * cg][:, idx].reshape(-1))
        rows.append(torch.stack(rg))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
        dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=2, dilation=2),
        dict(in_channels=3, out_channels=5, kernel_size=4, padding="same"),  # even kernel
        dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, padding_mode="replicate"),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="circular"),
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),  # depthwise
        dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", groups=2),
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv1d_unfold_and_gram_against_hand_patches_and_the_layer(conv):
    torch.manual_seed(0)
    conv = nn.Conv1d(**conv, bias=False)
    x = torch.randn(2, conv.in_channels, 11)
    ref = _patches_1d(x, conv)
    cols = unfold_inputs(x, conv)
    cols = cols if cols.dim() == 3 else cols[None]
    assert cols.shape == ref.shape and cols.shape[-1] == conv.weight[0].numel()
    assert torch.equal(cols, ref)
    # the columns times each group's weights are the layer's own output
    y = conv(x)
    w = conv.weight.reshape(conv.out_channels, -1).chunk(conv.groups)
    got = torch.cat([c @ wg.T for c, wg in zip(cols, w, strict=True)], dim=1)
    assert torch.allclose(got, y.permute(0, 2, 1).reshape(-1, conv.out_channels), atol=1e-5)
    stats = GramStats()
    stats.add(x, conv)
    want = torch.stack([(r.T @ r).double() for r in ref])
    assert torch.allclose(stats.gram, want.reshape(stats.gram.shape), rtol=1e-6)


def test_conv1d_padding():
    assert conv_padding(nn.Conv1d(1, 1, 3, padding=2)) == (2, 2)
    assert conv_padding(nn.Conv1d(1, 1, 3, padding="valid")) == (0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert conv_padding(nn.Conv1d(1, 1, 4, padding="same", dilation=2)) == (3, 3)
        assert conv_padding(nn.Conv1d(1, 1, 2, padding="same")) == (0, 1)


def test_conv1d_alpha_is_the_least_squares_of_the_layer_output():
    """With the codes fixed, the solved alpha of each output channel is the lstsq of the
    Conv1d's outputs on hand-unfolded patches (an independent reference)."""
    torch.manual_seed(1)
    conv = nn.Conv1d(3, 4, 3, padding=1, bias=False)
    x = torch.relu(torch.randn(8, 3, 10)) * torch.tensor([0.2, 1.0, 3.0])[:, None]
    stats = GramStats()
    stats.add(x, conv)
    w = conv.weight.detach().reshape(4, -1)
    t, alpha = tsq_ternary(w, stats.gram, iters=1)
    p = _patches_1d(x, conv)[0].double()
    for i in range(4):
        ref = torch.linalg.lstsq((p @ t[i].double())[:, None], (p @ w[i].double())[:, None])
        assert alpha[i].item() == pytest.approx(ref.solution.item(), rel=1e-5)


def _seq_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1), nn.ReLU(),
        nn.Conv1d(6, 8, 3, padding=1), nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8, 3),
    )  # fmt: skip


def test_train_a_conv1d_net_to_ternary_layers():
    """It used to crash in solve_alpha (the Conv1d input taken as a linear one)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 2, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    q = compactnn.train(_seq_net(), "w2a2-tsq", (x, y), epochs=2, progress=False)
    for i in (2, 4):
        assert set(q[i].weight_codes.unique().tolist()) <= {-1, 0, 1}
        a = q[i].weight_scale.reshape(-1, 1, 1)
        assert torch.equal(q[i].weight, a * q[i].weight_codes.float())


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3),
    )  # fmt: skip


def test_resume_is_exact_at_every_step(tmp_path):
    """3 epochs of 3 steps (96 samples, batch 32): code learning in epoch 1, the Gram
    collected in epoch 2 (steps 4-6), the solve at the start of epoch 3. Stopping at any
    step (inside the Gram epoch, at its end, after the solve) and resuming gives the
    uninterrupted run's logits bit for bit."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 1, 6, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    cfg = TSQConfig(epochs=3, code_epochs=2, batch_size=32)
    recipe = compactnn.Recipe("w2a2-tsq", (compactnn.Step("tsq", cfg),))
    ref = compactnn.train(_net(), recipe, (x, y), progress=False)(x)
    for stop in range(1, 9):
        ck = tmp_path / f"ck{stop}"
        compactnn.train(_net(), recipe, (x, y), progress=False, checkpoint_dir=ck, max_steps=stop)
        got = compactnn.train(_net(), recipe, (x, y), progress=False, checkpoint_dir=ck)(x)
        assert torch.equal(got, ref), f"stopped at step {stop}"
        shutil.rmtree(ck)


def test_checkpoint_state_carries_the_gram_and_drops_it_after_the_solve(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    cfg = TSQConfig(epochs=3, code_epochs=2, batch_size=32)
    recipe = compactnn.Recipe("w2a2-tsq", (compactnn.Step("tsq", cfg),))
    for stop, has_gram in ((3, True), (5, False)):  # inside the Gram epoch; after the solve
        ck = tmp_path / f"ck{stop}"
        compactnn.train(_net(), recipe, (x, y), progress=False, checkpoint_dir=ck, max_steps=stop)
        model = torch.load(ck / "qat-checkpoint.pt", weights_only=True)["model"]
        gram = model["2.weight_quantizer.gram"]
        assert (gram.numel() > 0) is has_gram
        if has_gram:
            assert gram.shape == (36, 36) and int(model["2.weight_quantizer.gram_batches"]) == 1
            assert model["4.weight_quantizer.gram"].shape == (2, 36, 36)  # one per group
        assert model["2.weight_quantizer.alpha"].numel() == (0 if has_gram else 8)  # solved?
        assert int(model["2.weight_quantizer.started"]) == (1 if has_gram else 2)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("w3a3-tsq", "Use w2a2-tsq (the documented recipe; w2a3-tsq keeps 3-bit activations)"),
        ("w4a2-tsq", "not 4. Use w2a2-tsq (the documented recipe)."),
    ],
)
def test_bad_bits_suggest_the_documented_recipe(name, message):
    with pytest.raises(CompactnnError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compactnn.train(nn.Linear(4, 3), name, (torch.randn(8, 4), torch.randint(0, 3, (8,))))


def test_calibration_keeps_the_float_weights_and_compress_solves_on_every_batch():
    """Step 1 starts from the float weights: calibration used to solve (on its first
    batch's Gram) and overwrite the latent weights with ``alpha t``. Outside training the
    solve runs at export, on the Gram of every calibration batch."""
    from compactnn.training.wrap import prepare_qat

    net = _net()
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(96, 1, 6, 6, generator=g))
    q = prepare_qat(net, "w2a2-tsq", x, seed=0, progress=False)
    assert torch.equal(q[2].layer.weight, net[2].weight)
    assert q[2].weight_quantizer.alpha.numel() == 0  # not solved yet
    stats = q[2].weight_quantizer.stats
    assert stats.batches == 3  # 96 calibration samples in batches of 32, all collected
    t, alpha = tsq_ternary(net[2].weight.detach().reshape(8, -1), stats.gram)
    frozen = compactnn.compress(_net(), "w2a2-tsq", calib_data=x, progress=False)[2]
    assert torch.equal(frozen.weight_codes.reshape(8, -1).float(), t)
    assert torch.allclose(frozen.weight_scale.reshape(-1), alpha, rtol=1e-3)


def test_state_round_trip_and_an_older_state_without_the_new_keys():
    from compactnn.quant.tsq import TSQWeight

    wq = TSQWeight(code_epochs=1, iters=1, least_squares=True)
    wq.stats.add(torch.ones(2, 3), None)
    wq.started.fill_(1)
    state = wq.state_dict()
    assert set(state) == {"alpha", "started", "gram", "gram_batches"}
    back = TSQWeight(code_epochs=1, iters=1, least_squares=True)
    back.load_state_dict(state)
    assert torch.equal(back.stats.gram, wq.stats.gram) and back.stats.batches == 1
    assert int(back.started) == 1
    old = TSQWeight(code_epochs=1, iters=1, least_squares=True)
    old.load_state_dict({"alpha": torch.ones(3)})  # solved, saved before epoch and gram
    assert torch.equal(old.alpha, torch.ones(3)) and int(old.started) == -1
