"""TSQ: the least-squares ternary solve against references, training, save/load, deploy."""

import itertools

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.quant.tsq import (
    GramStats,
    TSQConfig,
    grouped_ternary,
    solve_alpha,
    solve_codes,
    ternary_objective,
    tsq_ternary,
    unfold_geometry,
    unfold_inputs,
)


def _problem(out=4, k=6, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, k, generator=g, dtype=torch.float64))  # quantized inputs
    w = torch.randn(out, k, generator=g, dtype=torch.float64)
    t = torch.randint(-1, 2, (out, k), generator=g).double()
    return x, w, t


def test_alpha_step_is_the_one_dimensional_least_squares():
    x, w, t = _problem()
    alpha = solve_alpha(w, t, x.T @ x)
    for i in range(w.shape[0]):
        # min_a || X w_i - a X t_i ||: lstsq of the column X t_i against X w_i
        ref = torch.linalg.lstsq((x @ t[i])[:, None], (x @ w[i])[:, None]).solution
        assert alpha[i].item() == pytest.approx(ref.item(), rel=1e-10)


def test_code_sweep_equals_brute_force_per_coordinate_and_never_increases():
    x, w, t = _problem()
    gram = x.T @ x
    alpha = solve_alpha(w, t, gram)
    new = solve_codes(w, alpha, t, gram)
    # reference: the same sweep by trying the three values of each code on the full objective
    ref = t.clone()
    for j in range(w.shape[1]):
        for i in range(w.shape[0]):
            best = min(
                (-1.0, 0.0, 1.0),
                key=lambda v: (
                    ternary_objective(w[i : i + 1], alpha[i : i + 1], _set(ref[i : i + 1], j, v),
                                      gram).item(), v != ref[i, j].item(),
                ),
            )  # fmt: skip
            ref[i, j] = best
    assert torch.equal(new, ref)
    before = ternary_objective(w, alpha, t, gram)
    assert (ternary_objective(w, alpha, new, gram) <= before + 1e-12).all()


def _set(t, j, v):
    t = t.clone()
    t[0, j] = v
    return t


def test_solve_reaches_the_exhaustive_optimum_on_a_small_problem():
    x, w, _ = _problem(out=3, k=4, n=30, seed=1)
    gram = x.T @ x
    t, alpha = tsq_ternary(w, gram, iters=5)
    got = ternary_objective(w, alpha.double(), t.double(), gram)
    for i in range(3):
        best = float("inf")
        for codes in itertools.product((-1.0, 0.0, 1.0), repeat=4):
            c = torch.tensor([codes], dtype=torch.float64)
            a = solve_alpha(w[i : i + 1], c, gram)
            best = min(best, ternary_objective(w[i : i + 1], a, c, gram).item())
        assert got[i].item() <= best * 1.05 + 1e-9  # coordinate descent: within 5%


def test_least_squares_beats_plain_ternarisation_on_the_layer_output():
    x, w, _ = _problem(out=8, k=12, n=200, seed=2)
    x = x * torch.linspace(0.1, 3, 12, dtype=torch.float64)  # uneven input scales
    t_ls, a_ls = tsq_ternary(w, x.T @ x)
    t_pl, a_pl = tsq_ternary(w, None)
    err = lambda t, a: (x @ w.T - x @ (a[:, None] * t).double().T).pow(2).sum()  # noqa: E731
    assert err(t_ls, a_ls) < 0.8 * err(t_pl, a_pl)


def _conv_from_columns(cols, conv, shape):
    """The conv's output from unfolded columns: each group's columns times its weights."""
    n, out, h, w = shape
    cols = cols if cols.dim() == 3 else cols[None]
    weights = conv.weight.reshape(out, -1).chunk(len(cols))
    y = torch.cat([c @ wg.T for c, wg in zip(cols, weights, strict=True)], dim=1)
    return y.reshape(n, h * w, out).permute(0, 2, 1).reshape(shape)


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding="same"),
        dict(in_channels=3, out_channels=5, kernel_size=(2, 4), padding="same", dilation=(1, 2)),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
        dict(in_channels=3, out_channels=5, kernel_size=2, padding="same", padding_mode="reflect"),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, padding_mode="replicate"),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="circular"),
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),  # depthwise
        dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", groups=2,
             padding_mode="reflect"),
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unfold_matches_the_convolution(conv):
    """Unfolded inputs times the weights give the layer's own output, whatever its padding
    (explicit, "same" with an even kernel, "valid", reflect/replicate/circular) and groups;
    the Gram is each group's columns' own."""
    torch.manual_seed(0)
    conv = nn.Conv2d(**conv, bias=False)
    x = torch.randn(2, conv.in_channels, 7, 7)
    ref = conv(x)
    cols = unfold_inputs(x, conv)
    assert cols.shape[-1] == conv.weight[0].numel()
    assert torch.allclose(_conv_from_columns(cols, conv, ref.shape), ref, atol=1e-5)
    stats = GramStats(max_batches=1)
    stats.add(x, unfold_geometry(conv))
    stats.add(x, conv)  # past max_batches: ignored
    want = torch.stack([c.T @ c for c in (cols if cols.dim() == 3 else cols[None])])
    assert torch.allclose(stats.gram, want.reshape(stats.gram.shape).double(), rtol=1e-5)


def test_grouped_layers_solve_each_group_on_its_own_gram():
    """Depthwise: every output channel is fitted on the Gram of its own input channel's
    columns, which lowers the layer's output error below plain ternarisation."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    x = torch.relu(torch.randn(16, 4, 6, 6)) * torch.tensor([0.1, 1.0, 3.0, 0.5])[:, None, None]
    cols = unfold_inputs(x, conv)  # (4, rows, 9)
    w = conv.weight.detach().reshape(4, -1)
    t, alpha = grouped_ternary(w, torch.stack([c.T @ c for c in cols]))
    for g in range(4):  # the same as solving that channel alone on its Gram
        tg, ag = tsq_ternary(w[g : g + 1], cols[g].T @ cols[g])
        assert torch.equal(t[g], tg[0]) and alpha[g] == ag[0]
    err = lambda t, a: sum(  # noqa: E731
        (c @ w[g] - c @ (a[g] * t[g])).pow(2).sum() for g, c in enumerate(cols)
    )
    t0, a0 = grouped_ternary(w, None)
    assert err(t, alpha) < err(t0, a0)


def test_train_on_same_valid_reflect_and_depthwise_convs():
    """The least squares runs on every middle conv kind (it used to fail in F.unfold on
    padding="same"); the frozen layers are ternary and reproduce the trained model."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same"), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding="valid"), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3),
    )  # fmt: skip
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    cfg = TSQConfig(epochs=2, code_epochs=1, batch_size=8)
    recipe = compactnn.Recipe("w2a2-tsq", (compactnn.Step("tsq", cfg),))
    q = compactnn.train(net, recipe, (x, y), progress=False)
    for i in (2, 4, 6, 8):
        assert set(q[i].weight_codes.unique().tolist()) <= {-1, 0, 1}
        a = q[i].weight_scale.reshape(-1, 1, 1, 1)
        assert torch.equal(q[i].weight, a * q[i].weight_codes.float())


def test_config_rules():
    with pytest.raises(CompactnnError, match="code_epochs"):
        TSQConfig(epochs=3, code_epochs=3)
    with pytest.raises(CompactnnError, match="ternary"):
        TSQConfig(weight=TSQConfig().weight.__class__(bits=4))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3),
    )  # fmt: skip


def test_train_solves_saves_loads_bit_exact(tmp_path):
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    cfg = TSQConfig(epochs=2, code_epochs=1, batch_size=32)
    recipe = compactnn.Recipe("w2a2-tsq", (compactnn.Step("tsq", cfg),))
    q = compactnn.train(_net(), recipe, (x, y), progress=False)
    layer = q[2]
    assert set(layer.weight_codes.unique().tolist()) <= {-1, 0, 1}
    a = layer.weight_scale.reshape(8, 1, 1, 1)
    assert torch.equal(layer.weight, a * layer.weight_codes.float())
    assert layer.weight_scale.shape == (8, 1)  # one alpha per output channel
    compactnn.save(q, tmp_path / "tsq")
    q2 = compactnn.load(tmp_path / "tsq", model=_net())
    assert torch.equal(q(x), q2(x))
    assert torch.equal(compactnn.compress(_net(), "w2a2-tsq", calib_data=x, progress=False)[2]
                       .weight_codes.abs().max(), torch.tensor(1, dtype=torch.int8))  # fmt: skip
