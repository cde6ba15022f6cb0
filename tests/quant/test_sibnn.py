import pytest
import torch
from torch import nn

import compactnn
from compactnn.engines.binary import BinaryBlock
from compactnn.errors import CompactnnError
from compactnn.quant.sibnn import SIBNNConfig, SparseAct, activation_sparsity, binary_act
from compactnn.recipe import Recipe, Step, resolve_recipe


def _hand_grads(u, delta, rho):
    """The written piecewise derivatives of s(u) (docstring of quant/sibnn.py)."""
    inside, above = u.abs() < delta, u > delta
    du = torch.where(inside, 1 / (2 * delta), torch.where(above, rho / (2 * delta), 0.0))
    dd = torch.where(
        inside, -u / (2 * delta**2), torch.where(above, -rho * u / (2 * delta**2), 0.0)
    )
    return du, dd


@pytest.mark.parametrize("levels", ["01", "pm1"])
def test_trainable_backward_matches_the_written_formula(levels):
    torch.manual_seed(0)
    u = (torch.randn(200) * 2).requires_grad_()
    delta = torch.tensor(0.7, requires_grad=True)
    a = binary_act(u, delta, 0.3, levels)
    hard = (u.detach() >= 0).float()
    assert torch.equal(a.detach(), hard if levels == "01" else 2 * hard - 1)
    g = torch.randn(200)
    (a * g).sum().backward()
    du, dd = _hand_grads(u.detach(), 0.7, 0.3)
    k = 1.0 if levels == "01" else 2.0
    assert torch.allclose(u.grad, k * g * du, atol=1e-6)
    assert torch.allclose(delta.grad, k * (g * dd).sum(), atol=1e-5)


def test_ste_backward_is_clipped_and_halved_for_zero_one():
    u = torch.tensor([-1.5, -0.5, 0.0, 0.9, 2.0], requires_grad=True)
    binary_act(u, None, 0.5, "01").sum().backward()
    assert torch.equal(u.grad, torch.tensor([0.0, 0.5, 0.5, 0.5, 0.0]))


def test_act_starts_delta_at_the_channel_std():
    act = SparseAct(3, conv=True)
    u = torch.randn(8, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    act(u)
    assert torch.allclose(act.delta, u.transpose(0, 1).reshape(3, -1).std(dim=1))
    assert bool(act.ready)


def test_default_blocks_are_unchanged():
    block = BinaryBlock(nn.Linear(4, 4), "xnor", None)
    assert block.act is None and not any(k.startswith("act") for k in block.state_dict())


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3),
    )  # fmt: skip


@pytest.mark.parametrize("levels,backward", [("01", "trainable"), ("pm1", "ste")])
def test_train_save_load_bit_exact_and_sparsity(tmp_path, levels, backward):
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    cfg = SIBNNConfig(levels=levels, backward=backward, epochs=1, batch_size=32)
    q = compactnn.train(_cnn(), Recipe("si", (Step("sibnn", cfg),)), (x, y), progress=False)
    block = q[2]
    assert isinstance(block, BinaryBlock) and block.act.levels == levels
    compactnn.save(q, tmp_path / "si")
    q2 = compactnn.load(tmp_path / "si", model=_cnn())
    assert torch.equal(q(x), q2(x))
    assert torch.equal(q2[2].act.delta, block.act.delta)
    # sparsity by hand: the share of inputs below the thresholds of the two binary blocks
    with torch.no_grad():
        xs = [q[:i](x) - q[i].shift.reshape(1, -1, 1, 1) for i in (2, 4)]
    zeros = sum(int((t < 0).sum()) for t in xs) / sum(t.numel() for t in xs)
    assert activation_sparsity(q, x) == pytest.approx(zeros)


def test_short_name_and_config_errors():
    cfg = resolve_recipe("w1a1-sibnn").steps[0].config
    assert (cfg.levels, cfg.backward) == ("01", "trainable")
    with pytest.raises(CompactnnError, match="levels"):
        SIBNNConfig(levels="01x")
    with pytest.raises(CompactnnError, match="ede=False"):
        SIBNNConfig(ede=True)


@pytest.mark.parametrize("recipe, got", [("w1a8-sibnn", "not a8"), ("w1-sibnn", "not no")])
def test_recipes_without_binary_activations_are_refused(recipe, got):
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    with pytest.raises(CompactnnError, match=f"{got}.*use w1a1-sibnn"):
        compactnn.train(_cnn(), recipe, (x, y), epochs=1, progress=False)
