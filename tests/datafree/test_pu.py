import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compactnn.datafree import pu_compress, select_in_distribution
from compactnn.datafree.pu import nnpu_risk, robust_class_weights, robust_kd_loss
from compactnn.errors import CompactnnError


def test_nnpu_risk_by_hand():
    g_p, g_u = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -0.5, 3.0])
    s = torch.sigmoid
    pos = 0.3 * float(s(-g_p).mean())
    neg = float(s(g_u).mean()) - 0.3 * float(s(g_p).mean())
    risk, obj = nnpu_risk(g_p, g_u, 0.3)
    assert neg > 0 and float(risk) == pytest.approx(pos + neg) == float(obj)
    # the correction: a negative part below zero is climbed back (objective = -negative)
    g_p, g_u = torch.tensor([5.0, 5.0]), torch.tensor([-5.0])
    neg = float(s(g_u).mean()) - 0.9 * float(s(g_p).mean())
    risk, obj = nnpu_risk(g_p, g_u, 0.9)
    assert neg < 0 and float(obj) == pytest.approx(-neg)
    assert float(risk) == pytest.approx(0.9 * float(s(-g_p).mean()))


def test_robust_weights_and_loss_by_hand():
    t = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    w = robust_class_weights(t)
    mass = F.softmax(t, 1).sum(0)
    ref = (1 / mass) / (1 / mass).sum() * 2
    assert torch.allclose(w, ref) and float(w.sum()) == pytest.approx(2.0)
    s = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.0]])
    noise = torch.tensor([[0.1, 0.0], [0.0, 0.1]])
    kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)
    cls = t.argmax(1)
    cands = [(v[cls] * kl).mean() for v in (w, w + noise[0], w + noise[1])]
    assert float(robust_kd_loss(s, t, w, noise)) == pytest.approx(float(max(cands)))


def _teacher_and_data():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    x_in = torch.randn(200, 4) + torch.tensor([3.0, 0, 0, 0])
    x_out = torch.randn(200, 4) - torch.tensor([3.0, 0, 0, 0])
    return teacher.eval(), x_in, x_out


def test_pu_selection_separates_the_pool():
    teacher, x_in, x_out = _teacher_and_data()
    pool = torch.cat([x_in[20:], x_out[20:]])  # 180 in, 180 out
    mask = select_in_distribution(teacher, x_in[:20], pool, prior=0.5, epochs=150, progress=False)
    accuracy = float((mask == (torch.arange(360) < 180)).float().mean())
    assert accuracy > 0.9
    with pytest.raises(CompactnnError, match="prior"):
        select_in_distribution(teacher, x_in, pool, prior=1.0)


def test_pu_compress_trains_the_student():
    teacher, x_in, x_out = _teacher_and_data()
    student = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    s0 = [p.clone() for p in student.parameters()]
    out, info = pu_compress(
        student, teacher, x_in[:20], torch.cat([x_in[20:], x_out[20:]]), epochs=2, progress=False
    )
    assert out is student and info["selected"].shape == (360,)
    assert any(not torch.equal(a, b) for a, b in zip(s0, student.parameters(), strict=True))
