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
