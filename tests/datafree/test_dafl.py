import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compactnn.datafree import Generator, generate, train_dafl
from compactnn.datafree.dafl import dafl_generator_loss
from compactnn.errors import CompactnnError


def test_generator_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    p = F.softmax(logits, 1)
    ce = -(math.log(p[0, 0]) + math.log(p[1, 1])) / 2
    act = -(1 + 3 + 0.5 + 0.5) / 4
    pbar = p.mean(0)
    ent = float((pbar * pbar.log()).sum())
    got = float(dafl_generator_loss(logits, feats, oh=0.5, a=2.0, ie=3.0))
    assert got == pytest.approx(0.5 * ce + 2.0 * act + 3.0 * ent, rel=1e-6)


def test_generator_shapes_and_errors():
    g = Generator((1, 8, 8), latent=10, width=4)
    assert g(torch.randn(3, 10)).shape == (3, 1, 8, 8)
    with pytest.raises(CompactnnError, match="multiples of 4"):
        Generator((1, 10, 10))


def test_dafl_trains_student_and_leaves_teacher(tiny_teacher):
    from tests.datafree.conftest import TinyCNN

    before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    torch.manual_seed(1)
    student = TinyCNN(width=2)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    _gen, out, cost = train_dafl(
        tiny_teacher, student, input_shape=(1, 8, 8), steps=5, batch_size=8, progress=False
    )
    assert out is student
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items())
    assert all(torch.equal(v, tiny_teacher.state_dict()[k]) for k, v in before.items())
    assert cost["generated"] == 40 and cost["method"] == "dafl"
    _, _, cost = train_dafl(
        tiny_teacher,
        student,
        input_shape=(1, 8, 8),
        steps=6,
        batch_size=8,
        replay=True,
        buffer_size=16,
        warmup=2,
        progress=False,
    )
    assert cost["method"] == "dafl-replay" and cost["generated"] < 6 * 8 + 16


def test_dafl_generate_and_no_classifier(tiny_teacher):
    data = generate(tiny_teacher, 10, input_shape=(1, 8, 8), method="dafl", steps=2, progress=False)
    assert data.x.shape == (10, 1, 8, 8) and data.cost["n"] == 10
    with pytest.raises(CompactnnError, match=r"nn\.Linear"):
        generate(
            nn.Sequential(nn.Conv2d(1, 3, 8), nn.Flatten()),
            4,
            input_shape=(1, 8, 8),
            method="dafl",
            progress=False,
        )


def test_generator_step_bn_term_matches_formula(tiny_teacher):
    """``bn > 0`` adds ``bn * sum_l ||mean - mu|| + ||std - sigma||`` to DAFL's loss."""
    from compactnn.datafree.dafl import _generator_step, _setup

    teacher, gen, tap = _setup(tiny_teacher, (1, 8, 8), 10, 4, seed=3, bn=0.7)
    opt = torch.optim.SGD(gen.parameters(), lr=0.0)
    torch.manual_seed(5)
    _, logits, got = _generator_step(teacher, gen, tap, opt, 16, (1.0, 0.1, 5.0), 0.7)
    # independent: the same batch, statistics from the BN inputs computed by hand
    torch.manual_seed(5)
    with torch.no_grad():
        x = gen(torch.randn(16, 10))
        want, want_bn = _formula(tiny_teacher, x)
    assert torch.allclose(logits, tiny_teacher(x), atol=1e-5)
    assert float(got) == pytest.approx(want, rel=1e-4)
    assert want_bn > 1.0  # the term is not vanishing on this teacher
    tap.remove()
    tap.stats.remove()
    with pytest.raises(CompactnnError, match="bn="):
        train_dafl(tiny_teacher, None, input_shape=(1, 8, 8), steps=1, bn=-1.0, progress=False)


def _formula(tiny_teacher, x):
    bns = [m for m in tiny_teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    h1 = tiny_teacher.features[:1](x)
    h2 = tiny_teacher.features[:4](x)
    want_bn = 0.0
    for h, m in zip((h1, h2), bns, strict=True):
        mean = h.mean((0, 2, 3))
        std = h.var((0, 2, 3), unbiased=False).add(1e-8).sqrt()
        want_bn += float(
            (mean - m.running_mean).norm() + (std - (m.running_var + m.eps).sqrt()).norm()
        )
    feats = tiny_teacher.features(x).mean((2, 3))
    return float(dafl_generator_loss(tiny_teacher(x), feats)) + 0.7 * want_bn, want_bn


def _gen_after(teacher, **kw):
    gen, _, _ = train_dafl(
        teacher,
        None,
        input_shape=(1, 8, 8),
        steps=2,
        batch_size=8,
        latent=10,
        width=4,
        progress=False,
        **kw,
    )
    return torch.cat([p.detach().flatten() for p in gen.parameters()])


def test_bn_term_on_by_default_with_batchnorm_and_off_without(tiny_teacher):
    default = _gen_after(tiny_teacher)
    assert torch.equal(default, _gen_after(tiny_teacher, bn=1.0))
    assert not torch.allclose(default, _gen_after(tiny_teacher, bn=0.0))
    no_bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    assert torch.equal(_gen_after(no_bn), _gen_after(no_bn, bn=0.0))  # no error: plain DAFL
    with pytest.raises(CompactnnError, match="no BatchNorm"):
        _gen_after(no_bn, bn=1.0)


@pytest.mark.parametrize("student", ["small", {"weight": 1}])
def test_a_student_that_is_not_a_module_is_refused(tiny_teacher, student):
    with pytest.raises(CompactnnError, match=r"student is a (str|dict), not a torch.nn.Module"):
        train_dafl(tiny_teacher, student, input_shape=(1, 8, 8), steps=1, progress=False)


@pytest.mark.parametrize("steps", [0, -3])
def test_train_dafl_refuses_steps_below_one(tiny_teacher, steps):
    with pytest.raises(CompactnnError, match=rf"steps={steps}: pass a positive number"):
        train_dafl(tiny_teacher, None, input_shape=(1, 8, 8), steps=steps, progress=False)


def test_sampling_zero_images_is_refused(tiny_teacher):
    from compactnn.datafree.dafl import sample

    gen = Generator((1, 8, 8))
    with pytest.raises(CompactnnError, match=r"n=0: ask for at least one input"):
        sample(gen, tiny_teacher, 0)
    assert sample(gen, tiny_teacher, 3).x.shape == (3, 1, 8, 8)
