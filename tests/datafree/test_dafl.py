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
