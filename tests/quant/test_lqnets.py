import itertools

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.basis import basis_levels
from compactnn.core.qlayers import ActQuantizer, is_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.quant.base import short_weight_spec
from compactnn.quant.lqnets import (
    BASIS_SEAM,
    LQAct,
    LQNetsConfig,
    LQWeight,
    code_table,
    fit_basis,
    grid_basis,
    levels_of,
    nearest_codes,
    qem_step,
)
from compactnn.recipe import Recipe, Step, resolve_recipe


def test_qem_step_by_hand_and_against_lstsq():
    # one signed basis: codes sign(x), v = <b, x> / N = mean|x|
    t1 = code_table(1, True)
    x = torch.tensor([[0.5, -1.5, 2.0, -1.0]])
    v = qem_step(x, torch.tensor([[1, 0, 1, 0]]), t1, torch.ones(1, 1))
    assert torch.allclose(v, torch.tensor([[1.25]]), atol=1e-5)
    # two bases, hand codes (rank 2), every row against the least-squares solver
    t2 = code_table(2, True)
    x = torch.tensor([[3.1, -0.9, 1.2, -2.8, 0.8, 2.9], [0.1, -0.4, 0.6, -0.2, 0.3, 0.5]])
    codes = torch.tensor([[3, 1, 2, 0, 2, 3], [1, 0, 3, 1, 2, 3]])
    v = qem_step(x, codes, t2, torch.zeros(2, 2))
    ref = torch.linalg.lstsq(t2[codes].double(), x.double().unsqueeze(-1)).solution[..., 0]
    assert torch.allclose(v.double(), ref, atol=1e-5)


def test_qem_on_01_codes_with_offset_column_against_lstsq():
    # activations: B = [1, b], b in {0, 1}^2 (the signed-input offset column)
    t = torch.cat([torch.ones(4, 1), code_table(2, False)], 1)
    x = torch.tensor([[-0.3, 0.1, 0.9, 1.4, 0.2, 1.1, -0.2]])
    codes = torch.tensor([[0, 1, 2, 3, 1, 3, 0]])
    v = qem_step(x, codes, t, torch.zeros(1, 3))
    ref = torch.linalg.lstsq(t[codes].double(), x.double().unsqueeze(-1)).solution[..., 0]
    assert torch.allclose(v.double(), ref, atol=1e-5)


def test_unused_code_bit_keeps_its_basis_component():
    # every value on code 0 of a {0,1} basis: B = 0, any v fits; the ridge keeps v
    t = code_table(2, False)
    old = torch.tensor([[0.7, 0.3]])
    v = qem_step(torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.long), t, old)
    assert torch.allclose(v, old)


@pytest.mark.parametrize("k,signed", [(1, True), (2, True), (3, True), (4, True), (2, False)])
def test_nearest_level_encoding_is_the_brute_force_optimum(k, signed):
    gen = torch.Generator().manual_seed(k)
    basis = torch.rand(3, k, generator=gen) + 0.05
    x = torch.randn(3, 40, generator=gen) * 2
    t = code_table(k, signed)
    levels = levels_of(basis, t)
    codes = nearest_codes(x, levels)
    got = (x - torch.gather(levels, 1, codes)).abs()
    vals = set(itertools.product((-1.0, 1.0) if signed else (0.0, 1.0), repeat=k))
    brute = torch.stack([(x - basis @ torch.tensor(b)[:, None]).abs() for b in vals]).amin(0)
    assert torch.allclose(got, brute, atol=1e-6)


@pytest.mark.parametrize("k,signed", [(2, True), (3, True), (2, False), (3, False)])
def test_basis_error_never_increases_over_qem_iterations(k, signed):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7)).abs_() ** 1.5
    if signed:
        x = x * torch.sign(torch.randn(4, 64, generator=torch.Generator().manual_seed(8)))
    start = grid_basis(x.abs().amax(-1), k, signed)
    _, history = fit_basis(x, start, code_table(k, signed), 15)
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(history))
    assert history[-1] < 0.9 * history[0]  # the fit buys something over the uniform grid


def test_weight_forward_is_the_levels_with_ste_and_a_momentum_qem_update():
    w = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    wq = LQWeight(w, short_weight_spec(2), momentum=0.9, init="grid", iters=0)
    wq.train()
    old = wq.basis.clone()
    out = wq(w)
    rows = w.detach().reshape(5, -1)
    levels = basis_levels(old.half().float())  # stored (float16) basis
    if not BASIS_SEAM:
        levels = levels.half().float()
    codes = nearest_codes(rows, levels)
    assert torch.equal(out.detach().reshape(5, -1), torch.gather(levels, 1, codes))
    expected = 0.9 * old + 0.1 * qem_step(rows, codes, code_table(2, True), old)
    assert torch.allclose(wq.basis, expected, atol=1e-6)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    with torch.no_grad():  # no update outside a training step
        before = wq.basis.clone()
        wq(w)
    assert torch.equal(wq.basis, before)


def test_act_forward_equals_the_frozen_nonuniform_grid_and_clips_gradient():
    aq = LQAct(2, momentum=0.9, init="fit", iters=10)
    aq.start_observing()
    calib = torch.relu(torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(3)))
    aq(calib)
    aq.finish_observing()
    assert not aq.signed and float(aq.offset) == 0.0
    levels = aq.export_levels()
    frozen = ActQuantizer(QuantSpec(bits=2, symmetric=False))
    frozen.set_levels(levels)
    mids = (levels[1:] + levels[:-1]) / 2
    x = torch.cat([torch.randn(500) * 2, mids, levels, levels[-1:] + 1]).requires_grad_()
    aq.eval()
    assert torch.equal(aq(x), frozen(x))
    aq.train()
    aq(x).sum().backward()
    inside = (x >= levels[0]) & (x <= levels[-1])
    assert torch.equal(x.grad, inside.float())


def test_signed_inputs_get_a_learned_offset():
    aq = LQAct(3, momentum=0.9, init="fit", iters=10)
    aq.start_observing()
    aq(torch.randn(2000, generator=torch.Generator().manual_seed(4)))
    aq.finish_observing()
    levels = aq.export_levels()
    assert aq.signed and levels[0] < -1.0 and levels[-1] > 1.0
    assert torch.equal(levels, torch.sort(levels).values)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3),
    )  # fmt: skip


def _train(name: str):
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 1, 6, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    cfg = resolve_recipe(name).steps[0].config
    cfg = type(cfg)(weight=cfg.weight, act=cfg.act, epochs=1, batch_size=32, distill=0.0)
    q = compactnn.train(_cnn(), Recipe(name, (Step("lqnets", cfg),)), (x, y), progress=False)
    return q, x


def test_weight_only_train_save_load_bit_exact(tmp_path):
    q, x = _train("w2-lqnets")
    layer = q[2]
    assert is_quant_layer(layer) and layer.weight_spec.bits == 2
    assert layer.format.endswith("-basis" if BASIS_SEAM else "-codebook")
    per_row = layer.weight.reshape(8, -1)
    assert all(len(torch.unique(r)) <= 4 for r in per_row)  # 2^K levels per channel
    compactnn.save(q, tmp_path / "lq")
    q2 = compactnn.load(tmp_path / "lq", model=_cnn())
    assert torch.equal(q(x), q2(x))


def test_w2a2_train_save_load_bit_exact_or_a_clear_refusal(tmp_path):
    if not BASIS_SEAM:  # the engine cannot install non-uniform activation grids: refused
        with pytest.raises(CompactnnError, match="non-uniform activation"):
            _train("w2a2-lqnets")
        return
    q, x = _train("w2a2-lqnets")
    aq = q[2].input_quantizer
    assert not aq.is_uniform and aq.levels[0] == 0.0 and len(aq.levels) == 4
    compactnn.save(q, tmp_path / "lq")
    q2 = compactnn.load(tmp_path / "lq", model=_cnn())
    assert torch.equal(q(x), q2(x))
    assert torch.equal(q2[2].input_quantizer.levels, aq.levels)


def test_short_names_and_config_errors():
    cfg = resolve_recipe("w2a2-lqnets").steps[0].config
    assert isinstance(cfg, LQNetsConfig) and (cfg.weight.bits, cfg.act.bits) == (2, 2)
    assert resolve_recipe("w3a3-lqnets").steps[0].config.act.bits == 3
    assert LQNetsConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CompactnnError, match=r"weight\.bits"):
        resolve_recipe("w5a2-lqnets")
    with pytest.raises(CompactnnError, match=r"act\.bits"):
        resolve_recipe("w2a8-lqnets")
    with pytest.raises(CompactnnError, match="momentum"):
        LQNetsConfig(momentum=1.0)
    with pytest.raises(CompactnnError, match="init"):
        LQNetsConfig(init="kmeans")
