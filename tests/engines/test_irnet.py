"""IR-Net's Libra-PB weights and error-decay estimator as options of the binary engine."""

import json
import math

import pytest
import torch
from torch import nn

import compactnn
from compactnn.engines.binary import BinaryBlock, BinaryWeight
from compactnn.engines.irnet import ede_grad, ede_sign, ede_t, libra_codes_levels, libra_weight
from compactnn.quant.xnor import XNORConfig
from compactnn.recipe import Recipe, Step


def test_ede_t_schedule_runs_from_0_1_to_10():
    assert ede_t(0, 10) == pytest.approx(0.1)
    assert ede_t(5, 10) == pytest.approx(1.0)
    assert ede_t(10, 10) == pytest.approx(10.0)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0, 3.0, 10.0])
def test_ede_gradient_is_autograd_of_k_tanh_tx(t):
    x = torch.linspace(-3, 3, 41, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    k = max(1 / t, 1.0)
    (k * torch.tanh(t * xr)).sum().backward()  # the written g(x) = k tanh(t x)
    xs = x.clone().requires_grad_(True)
    out = ede_sign(xs, t)
    assert torch.equal(out, torch.where(x >= 0, 1.0, -1.0).double())
    out.sum().backward()
    assert torch.allclose(xs.grad, xr.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ede_grad(x, t), xr.grad)


def test_ede_moves_from_identity_to_sign():
    x = torch.tensor([0.0, 0.5, 2.0])
    assert torch.allclose(ede_grad(x, 0.1), torch.ones(3), atol=0.05)  # ~identity early
    late = ede_grad(x, 10.0)
    assert late[0] == 10.0 and late[2] < 1e-6  # a sharp bump around 0 late


def test_libra_weight_is_balanced_standardised_with_power_of_two_scale():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * 0.05 + 0.02
    q = libra_weight(w, lambda v: torch.where(v >= 0, 1.0, -1.0))
    flat = w.reshape(4, -1)
    std = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
    s = torch.round(torch.log2(std.abs().mean(1)))  # hand computation of the shift
    ref = torch.where(std >= 0, 1.0, -1.0) * (2.0**s)[:, None]
    assert torch.equal(q.reshape(4, -1), ref)
    codes, levels = libra_codes_levels(w)
    decoded = torch.gather(levels.reshape(4, 2), 1, codes.reshape(4, -1).long())
    assert torch.equal(decoded, ref)


def test_libra_gradient_flows_through_the_standardisation():
    torch.manual_seed(0)
    w = torch.randn(3, 8, requires_grad=True)
    bw = BinaryWeight(libra_pb=True, ede=True, t_min=0.1)
    bw.start_epoch(w, 0, 4)  # t = 0.1 (the paper's start)
    g = torch.randn(3, 8)
    (bw(w) * g).sum().backward()
    # autograd of the written formula: (k tanh(t w_std)) * 2^s with the scale detached
    wr = w.detach().clone().requires_grad_(True)
    mu, sd = wr.mean(1, keepdim=True), wr.std(1, keepdim=True)
    std = (wr - mu) / sd
    scale = 2.0 ** torch.round(torch.log2(std.detach().abs().mean(1, keepdim=True)))
    (10 * torch.tanh(0.1 * std) * scale * g).sum().backward()
    assert torch.allclose(w.grad, wr.grad, atol=1e-5)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_irnet_options_train_save_load_bit_exact(tmp_path):
    model = _mlp()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    cfg = XNORConfig(libra_pb=True, ede=True, epochs=2, batch_size=32, min_steps=0)
    recipe = Recipe("w1a1-xnor-irnet", (Step("xnor", cfg),))
    q = compactnn.train(model, recipe, (x, y), progress=False)
    assert isinstance(q[2], BinaryBlock)
    levels = q[2].layer.weight.abs().unique()
    assert all(math.log2(v) == round(math.log2(v)) for v in levels.tolist())  # powers of two
    compactnn.save(q, tmp_path / "irnet")
    q2 = compactnn.load(tmp_path / "irnet", model=_mlp())
    assert torch.equal(q(x), q2(x))
    assert torch.equal(q2[2].layer.weight_codes, q[2].layer.weight_codes)


@pytest.mark.parametrize("ede", [False, True])
def test_block_uses_ede_for_activations(ede):
    torch.manual_seed(0)
    block = BinaryBlock(nn.Linear(4, 6), "bireal", BinaryWeight(ede=ede))  # no shortcut
    block.weight_quantizer.t = 0.1
    block.norm.eval()
    x = torch.randn(8, 4)
    x = (x.sign() * (x.abs() + 1.5)).requires_grad_(True)  # |x| > 1.5
    block(x).sum().backward()
    # Bi-Real's polynomial gradient is 0 outside (-1, 1); EDE at t = 0.1 is ~1 everywhere
    assert (x.grad != 0).all() if ede else torch.equal(x.grad, torch.zeros_like(x))


def test_ede_t_min_option_and_its_rule():
    from compactnn.errors import CompactnnError

    bw = BinaryWeight(ede=True, t_min=1.0)
    bw.start_epoch(torch.zeros(1), 0, 4)
    assert bw.t == pytest.approx(1.0)
    bw.start_epoch(torch.zeros(1), 2, 4)
    assert bw.t == pytest.approx(10**0.5)
    assert XNORConfig().ede_t_min == 1.0 and BinaryWeight().t_min == 1.0  # measured default
    with pytest.raises(CompactnnError, match="ede_t_min"):
        XNORConfig(ede_t_min=0.0)
    cfg = XNORConfig(libra_pb=True, ede=True, ede_t_min=1.0)
    assert XNORConfig.from_dict(cfg.to_dict()) == cfg


def test_irnet_options_bring_their_own_learning_rate(tmp_path):
    from dataclasses import replace

    from compactnn.engines.irnet import IRNET_LR
    from compactnn.errors import CompactnnError

    assert XNORConfig().lr == 5e-3  # plain XNOR keeps its default
    assert XNORConfig(lr=2e-3).lr == 2e-3
    for opts in ({"libra_pb": True}, {"ede": True}, {"libra_pb": True, "ede": True}):
        assert XNORConfig(**opts).lr == IRNET_LR
        assert XNORConfig(lr=7e-3, irnet_lr=None, **opts).lr == 7e-3  # None: keep lr
    cfg = XNORConfig(libra_pb=True, ede=True, irnet_lr=2e-3)
    assert cfg.lr == 2e-3 and replace(cfg, epochs=3).lr == 2e-3  # idempotent under replace
    assert XNORConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CompactnnError, match="irnet_lr"):
        XNORConfig(irnet_lr=0.0)
    # the optimizer really uses it: the logged lr of the first epoch
    model, x, y = _mlp(), torch.randn(64, 6), torch.randint(0, 3, (64,))
    cfg = XNORConfig(ede=True, irnet_lr=3e-4, epochs=1, batch_size=32, min_steps=0)
    log = tmp_path / "log.jsonl"
    compactnn.train(model, Recipe("r", (Step("xnor", cfg),)), (x, y), progress=False,
                    log_path=log)  # fmt: skip
    assert json.loads(log.read_text().splitlines()[0])["lr"] == pytest.approx(3e-4)


def test_ede_t_per_step_follows_the_papers_formula():
    bw = BinaryWeight(ede=True, t_min=0.1, per_step=True).train()
    w = torch.zeros(2, 3, requires_grad=True)
    spe, epochs, seen = 4, 3, []
    for epoch in range(epochs):
        bw.start_epoch(w, epoch, epochs)
        for _ in range(spe):
            bw(w)
            seen.append(bw.t)
    # the first epoch counts the steps and keeps t_min; then t = 0.1 * 10^(i/N * log10(100))
    assert seen[:spe] == [pytest.approx(0.1)] * spe
    for i in range(spe, spe * epochs):
        assert seen[i] == pytest.approx(0.1 * 10 ** (i / (spe * epochs) * 2.0))
    with torch.no_grad():  # scoring and batch-norm re-estimation are not steps
        bw(w)
    assert bw.t == seen[-1]


def test_ede_per_epoch_is_unchanged_by_steps():
    bw = BinaryWeight(ede=True, t_min=0.1).train()
    w = torch.zeros(2, 3, requires_grad=True)
    for epoch in range(2):
        bw.start_epoch(w, epoch, 4)
        for _ in range(3):
            bw(w)
    assert bw.t == pytest.approx(10**-0.5)  # epoch 1 of 4: 0.1 * 10^(1/4 * log10(100))


@pytest.mark.parametrize("ede_on", ["both", "weights", "acts"])
def test_ede_on_weights_or_activations_only(ede_on):
    torch.manual_seed(0)
    wq = BinaryWeight(libra_pb=True, ede=True, t_min=0.1, ede_on=ede_on)
    block = BinaryBlock(nn.Linear(4, 6), "bireal", wq)  # no shortcut
    block.norm.eval()
    x = torch.randn(8, 4)
    x = (x.sign() * (x.abs() + 1.5)).requires_grad_(True)  # |x| > 1.5: outside the STE
    block(x).sum().backward()
    # activations: EDE at t = 0.1 is ~1 everywhere, Bi-Real's polynomial is 0 there
    assert bool((x.grad != 0).all()) == (ede_on != "weights")
    assert bool((x.grad == 0).all()) == (ede_on == "weights")
    # weights: autograd of the written surrogate, k tanh(t w_std) (EDE) or clip(w_std, -1, 1)
    w, g = torch.randn(6, 4) * 0.1, torch.randn(6, 4)
    wg = w.clone().requires_grad_(True)
    (wq(wg) * g).sum().backward()
    wr = w.clone().requires_grad_(True)
    std = (wr - wr.mean(1, keepdim=True)) / wr.std(1, keepdim=True)
    scale = 2.0 ** torch.round(torch.log2(std.detach().abs().mean(1, keepdim=True)))
    surrogate = 10 * torch.tanh(0.1 * std) if ede_on != "acts" else std.clamp(-1, 1)
    (surrogate * scale * g).sum().backward()
    assert torch.allclose(wg.grad, wr.grad, atol=1e-5)


def test_irnet_weight_decay_is_the_gradient_of_an_l2_term():
    torch.manual_seed(0)
    w = torch.randn(3, 8, requires_grad=True)
    g = torch.randn(3, 8)
    wd = 0.05
    bw = BinaryWeight(libra_pb=True, ede=True, t_min=0.1, wd=wd).train()
    bw.start_epoch(w, 0, 4)
    (bw(w) * g).sum().backward()
    wr = w.detach().clone().requires_grad_(True)
    mu, sd = wr.mean(1, keepdim=True), wr.std(1, keepdim=True)
    std = (wr - mu) / sd
    scale = 2.0 ** torch.round(torch.log2(std.detach().abs().mean(1, keepdim=True)))
    loss = (10 * torch.tanh(0.1 * std) * scale * g).sum() + wd / 2 * (wr**2).sum()
    loss.backward()
    assert torch.allclose(w.grad, wr.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(bw.eval()(w), BinaryWeight(libra_pb=True)(w))  # forward unchanged


def test_new_irnet_options_are_validated_and_serialise():
    from compactnn.errors import CompactnnError

    for bad in ({"ede_on": "input"}, {"ede_t_max": 0.5}, {"irnet_wd": -1.0}):
        with pytest.raises(CompactnnError, match=next(iter(bad))):
            XNORConfig(**bad)
    cfg = XNORConfig(libra_pb=True, ede=True, ede_on="weights", ede_per_step=True,
                     ede_t_max=5.0, irnet_wd=1e-3)  # fmt: skip
    assert XNORConfig.from_dict(cfg.to_dict()) == cfg
    from compactnn.engines.binary import _binary_weight_quantizer

    default = XNORConfig(libra_pb=True, ede=True)  # measured default: EDE on the weights only
    wq = _binary_weight_quantizer(nn.Linear(2, 2), default.weight, default)
    assert default.ede_on == "weights" and wq.ede_weights and not wq.ede_acts
    assert not _binary_weight_quantizer(nn.Linear(2, 2), default.weight, XNORConfig()).ede_weights


def test_irnet_lr_replaces_only_the_default_lr_and_says_so():
    """T2 finding 6: a recipe's own lr was replaced by irnet_lr with a message the CLI does
    not show, and the record lost it. Now an lr other than the method's default is kept;
    replacing the default warns (one line, at the caller's line), naming both values."""
    import warnings
    from dataclasses import replace

    with pytest.warns(UserWarning) as caught:
        cfg = XNORConfig(libra_pb=True)  # xnor's default lr 5e-3: taken as unset
    assert cfg.lr == 2e-3 and cfg.recipe_lr == 5e-3
    (w,) = caught
    assert w.filename == __file__  # the user's line, not the package or dataclass code
    assert str(w.message) == (
        "xnor: with libra_pb/ede the weights train at irnet_lr=0.002 instead of lr=0.005 "
        "(xnor's default lr, so taken as unset); to train at 0.005, set irnet_lr: null "
        "(None in Python); any other lr is kept."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing replaced, or asked for: no warning
        assert XNORConfig(libra_pb=True, lr=1e-2).lr == 1e-2  # the user's own lr: kept
        assert XNORConfig(ede=True, lr=3e-3).to_dict()["lr"] == 3e-3
        assert XNORConfig(libra_pb=True, lr=1e-2, irnet_lr=None).lr == 1e-2
        assert XNORConfig(ede=True, irnet_lr=1e-3).lr == 1e-3  # their own irnet_lr
        assert XNORConfig.from_dict(cfg.to_dict()) == cfg  # a saved recipe: the same lr
        XNORConfig(lr=1e-2)
    with pytest.warns(UserWarning) as caught:  # dataclasses.replace: still the user's line
        assert replace(XNORConfig(), ede=True).lr == 2e-3
    assert [w.filename for w in caught] == [__file__]
    with pytest.warns(UserWarning, match=r"lr=0.004 and irnet_lr=0.001 are both set.*at lr=0.004"):
        assert XNORConfig(ede=True, lr=4e-3, irnet_lr=1e-3).lr == 4e-3
    model, x, y = _mlp(), torch.randn(64, 6), torch.randint(0, 3, (64,))
    with pytest.warns(UserWarning, match="irnet_lr=0.002 instead of lr=0.005"):
        cfg = XNORConfig(libra_pb=True, epochs=1, batch_size=32, min_steps=0)
    q = compactnn.train(model, Recipe("r", (Step("xnor", cfg),)), (x, y), progress=False)
    note = q._compactnn["extra"]["irnet"]
    assert (note["lr"], note["irnet_lr"], note["recipe_lr"]) == (2e-3, 2e-3, 5e-3)
    assert note["note"] == "the weights trained at irnet_lr instead of the recipe's lr 0.005"
    own = XNORConfig(libra_pb=True, lr=4e-3, epochs=1, batch_size=32, min_steps=0)
    q = compactnn.train(model, Recipe("r", (Step("xnor", own),)), (x, y), progress=False)
    note = q._compactnn["extra"]["irnet"]
    assert (note["lr"], note["recipe_lr"], note["note"]) == (4e-3, 4e-3, "the recipe's lr")
    plain = compactnn.train(model, "w1a1-xnor", (x, y), epochs=1, progress=False)
    assert "irnet" not in plain._compactnn["extra"]
