import itertools

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.quant.elq import ELQConfig, ELQWeight, elq_binary, elq_ternary, refit_scale
from compactnn.recipe import Recipe, Step, resolve_recipe


def _err(w, d, q):
    return float((d * (w - q) ** 2).sum())


def test_binary_scale_beats_every_scale_on_a_grid():
    torch.manual_seed(0)
    w, d = torch.randn(1, 40), torch.rand(1, 40) + 0.1
    codes, alpha = elq_binary(w, d)
    assert torch.equal(codes, torch.where(w >= 0, 1.0, -1.0))
    best = min(_err(w, d, a * codes) for a in torch.linspace(0, 3, 3001))
    assert _err(w, d, alpha[:, None] * codes) <= best + 1e-6
    assert abs(float(alpha) - float((d * w.abs()).sum() / d.sum())) < 1e-6


def test_ternary_is_the_exact_minimiser_over_all_codes():
    torch.manual_seed(1)
    w, d = torch.randn(1, 7), torch.rand(1, 7) + 0.1
    codes, alpha = elq_ternary(w, d)
    got = _err(w, d, alpha[:, None] * codes)
    best = float("inf")
    for t in itertools.product((-1.0, 0.0, 1.0), repeat=7):  # every code, its best scale
        t = torch.tensor([t])
        a = refit_scale(w, d, t).clamp(min=0)
        best = min(best, _err(w, d, a[:, None] * t))
    assert got == pytest.approx(best, abs=1e-6)
    # and against a grid of (alpha, threshold) pairs
    grid = min(
        _err(w, d, a * torch.sign(w) * (w.abs() > th))
        for a in torch.linspace(0.01, 3, 120)
        for th in torch.linspace(0, 3, 120)
    )
    assert got <= grid + 1e-6


def test_ternary_rows_and_hand_example():
    w = torch.tensor([[1.0, 0.9, 0.15, -0.5], [0.1, -2.0, 0.0, 0.05]])
    codes, alpha = elq_ternary(w, torch.ones_like(w))
    # row 0: top-3 |w| gives (2.4)^2/3 = 1.92, the best; alpha 0.8. row 1: top-1, alpha 2.
    assert torch.equal(codes, torch.tensor([[1.0, 1, 0, -1], [0, -1, 0, 0]]))
    assert torch.allclose(alpha, torch.tensor([0.8, 2.0]))


def test_incremental_portions_and_refits_by_hand():
    w = torch.tensor([[1.0, 0.9, 0.15, -0.5]])
    q = ELQWeight(w, bits=2, portions=(0.5, 0.75))
    q.start_epoch(w, 0, 2)  # alpha 0.8, errors .04 .01 .0225 .09: freeze 3 and 0
    assert q.frozen.tolist() == [[True, False, False, True]]
    assert q.alpha.item() == pytest.approx(0.75)  # (1 + 0.5) / 2
    a = torch.tensor(0.75).half().float()
    assert torch.equal(q(w), torch.tensor([[a, 0.9, 0.15, -a]]))
    q.start_epoch(w, 1, 2)  # free errors .01 (idx 1), .0225 (idx 2): freeze idx 2 (code 0)
    assert q.frozen.tolist() == [[True, False, True, True]]
    assert q.codes.tolist() == [[1.0, 0.0, 0.0, -1.0]]
    codes, alpha = q.final(w)  # 0.9 > 0.75 / 2: code 1; alpha (1 + .9 + .5) / 3
    assert codes.tolist() == [[1.0, 1.0, 0.0, -1.0]]
    assert alpha.item() == pytest.approx(0.8)


def test_hessian_is_adams_second_moment_of_the_quantized_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    q = ELQWeight(w, bits=1, beta=0.9, scale_grad=False)
    g = torch.randn(3, 4)
    (q(w) * g).sum().backward()
    assert torch.allclose(q.sq_grad, 0.1 * g * g)
    assert torch.allclose(q.hessian(), g.abs() + 1e-8)  # bias-corrected: sqrt(g^2)
    assert torch.equal(w.grad, g)  # straight-through


def test_approximation_error_term_by_hand():
    torch.manual_seed(0)
    w = torch.randn(2, 5, requires_grad=True)
    q = ELQWeight(w, bits=1, beta=0.9, scale_grad=False, approx=2.0)
    g = torch.randn(2, 5)
    (q(w) * g).sum().backward()
    d = g.abs() + 1e-8  # the loss term's weights (bias-corrected sqrt(g^2))
    assert torch.allclose(q.hessian(), d + 2.0 * d.mean(1, keepdim=True))
    codes, alpha = q.solve(w)
    w0 = w.detach()
    for r in range(2):  # alpha minimises loss term + 2 mean(d) * approximation error

        def f(a, r=r):
            e = (w0[r] - a * codes[r]) ** 2
            return float((d[r] * e).sum() + 2.0 * d[r].mean() * e.sum())

        assert f(float(alpha[r])) <= min(f(a) for a in torch.linspace(0, 3, 3001)) + 1e-6


def test_scale_gradient_by_hand():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    out = ELQWeight(w, bits=1)(w)  # d = 1: alpha = mean|w| per row
    (out * g).sum().backward()
    s, alpha = torch.sign(w.detach()), w.detach().abs().mean(1, keepdim=True)
    assert torch.allclose(out.detach(), alpha.half().float() * s)
    # d/dw of alpha(w) * s with s held, plus alpha through the straight-through codes
    hand = alpha.half().float() * g + s * (g * s).sum(1, keepdim=True) / 4
    assert torch.allclose(w.grad, hand, atol=1e-6)


def test_short_names_and_config_errors():
    assert resolve_recipe("w1a8-elq").steps[0].config.weight.bits == 1
    assert resolve_recipe("w2a8-elq").steps[0].config.weight.bits == 2
    with pytest.raises(CompactnnError, match="elq quantizes weights"):
        ELQConfig.from_short(4, 8, None)
    with pytest.raises(CompactnnError, match="portions"):
        ELQConfig(portions=(0.75, 0.5))
    with pytest.raises(CompactnnError, match="approx"):
        ELQConfig(approx=-0.5)
    for bad in (-1, 2.5, True):
        with pytest.raises(CompactnnError, match="min_steps"):
            ELQConfig(min_steps=bad)


def test_binary_short_name_trains_with_the_xnor_budget_ternary_unchanged():
    import compactnn.quant.xnor  # noqa: F401  (registers w1a8-xnor)

    keys = ("epochs", "min_steps", "lr", "lr_quant", "distill")
    elq = resolve_recipe("w1a8-elq").steps[0].config
    xnor = resolve_recipe("w1a8-xnor").steps[0].config
    assert {k: getattr(elq, k) for k in keys} == {k: getattr(xnor, k) for k in keys}
    assert (elq.epochs, elq.min_steps, elq.lr, elq.lr_quant, elq.distill) == (6, 600, 5e-3, 1e-2, 0)
    ter = resolve_recipe("w2a8-elq").steps[0].config
    assert (ter.epochs, ter.min_steps, ter.lr, ter.lr_quant, ter.distill) == (4, 0, 1e-3, 1e-3, 0.5)
    assert (elq.approx, ter.approx) == (0.0, 0.0)  # loss term only (chosen on validation)
    assert ELQConfig.from_short(1, 8, None, approx=1.0).approx == 1.0
    assert ELQConfig.from_short(1, 8, None, lr=2e-3, min_steps=0).lr == 2e-3  # keywords win
    assert ELQConfig.from_short(1, 8, None, min_steps=0).min_steps == 0


def test_min_steps_raises_the_epochs_unless_epochs_are_given():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    cfg = ELQConfig.from_short(1, 8, None, epochs=1, batch_size=32, min_steps=5)
    recipe = Recipe("elq", (Step("elq", cfg),))
    hist = compactnn.info_of(compactnn.train(model, recipe, (x, y), progress=False))
    assert (hist["extra"]["training"]["epochs"], hist["extra"]["training"]["steps"]) == (3, 6)
    q = compactnn.train(model, recipe, (x, y), epochs=2, progress=False)
    assert compactnn.info_of(q)["extra"]["training"]["steps"] == 4  # explicit epochs win


@pytest.mark.parametrize(
    "bits,portions,frozen", [(1, (), True), (2, (0.5, 0.75), True), (1, (0.5, 1.0), False)]
)
def test_train_save_load_bit_exact(tmp_path, bits, portions, frozen):
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
        )

    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    cfg = ELQConfig.from_short(
        bits,
        8,
        None,
        epochs=2,
        batch_size=32,
        portions=portions,
        min_steps=0,
        frozen_codes=frozen,
    )
    q = compactnn.train(mlp(), Recipe("elq", (Step("elq", cfg),)), (x, y), progress=False)
    assert compactnn.info_of(q)["extra"]["training"]["steps"] == 4  # 2 epochs of 2 batches
    mid = q[2]
    values = mid.weight_codes.unique().tolist()
    assert values == ([0, 1] if bits == 1 else [-1, 0, 1])
    compactnn.save(q, tmp_path / "elq")
    q2 = compactnn.load(tmp_path / "elq", model=mlp())
    assert torch.equal(q(x), q2(x))


def test_incremental_straight_through_by_hand():
    torch.manual_seed(0)
    w = torch.randn(2, 8, requires_grad=True)
    q = ELQWeight(w, bits=1, portions=(0.5, 1.0), frozen_codes=False)
    q.start_epoch(w.detach(), 0, 2)  # half of each row quantized, d = 1
    m = q.frozen
    assert m.sum(1).tolist() == [4, 4]
    g = torch.randn(2, 8)
    out = q(w)
    (out * g).sum().backward()
    s, wd = torch.sign(w.detach()), w.detach()
    alpha = ((wd.abs() * m).sum(1, keepdim=True) / 4).half().float()  # over the quantized half
    assert torch.allclose(out.detach(), torch.where(m, alpha * s, wd))
    # quantized: straight-through codes + d alpha / dw over the quantized half; free: float
    hand = torch.where(m, alpha * g + s * (g * s * m).sum(1, keepdim=True) / 4, g)
    assert torch.allclose(w.grad, hand, atol=1e-6)
    # the last stage (1.0) is the plain straight-through training, frozen codes or not
    v = torch.randn(3, 5)
    staged = ELQWeight(v, bits=2, portions=(0.5, 1.0), frozen_codes=False)
    staged.start_epoch(v, 1, 2)
    assert staged.frozen.all() and int(staged.stage) == 2
    assert torch.equal(staged(v), ELQWeight(v, bits=2)(v))
    (c1, a1), (c2, a2) = staged.final(v), elq_ternary(v, torch.ones_like(v))
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
