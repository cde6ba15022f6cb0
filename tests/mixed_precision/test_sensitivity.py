import numpy as np
import pytest
import torch
from torch import nn

from compactnn.core.hessian import hutchinson_trace
from compactnn.mixed_precision.formats import parse_formats, rtn_weight
from compactnn.mixed_precision.sensitivity import SensitivityCache, sensitivity


def test_hutchinson_linear_matches_hand_trace():
    # L = ||W x - y||^2 summed over N rows: H = 2 (I_out kron X^T X), Tr = 2 * out * ||X||_F^2
    # Rademacher v gives v^T H v exactly Tr(H) only in expectation; many samples converge
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    est = hutchinson_trace(lambda: (x @ w.T - y).pow(2).sum(), [w], samples=100)
    # (seeded: deterministic; a factor-of-two error in H v would miss by 50%)
    assert float(est[0]) == pytest.approx(2 * 3 * float(x.pow(2).sum()), rel=0.1)


def test_hutchinson_matches_exact_hessian_per_block():
    torch.manual_seed(1)
    w1, w2 = torch.randn(4, 3), torch.randn(2, 4)
    x = torch.randn(6, 3)

    def loss_of(a, b):
        return torch.tanh(x @ a.T).matmul(b.T).pow(2).sum()

    full = torch.autograd.functional.hessian(loss_of, (w1, w2))
    h1, h2 = full[0][0], full[1][1]
    blocks = [h1.reshape(12, 12).double(), h2.reshape(8, 8).double()]
    p1, p2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    est = hutchinson_trace(lambda: loss_of(p1, p2), [p1, p2], samples=200, seed=3)
    for e, h in zip(est.tolist(), blocks, strict=True):
        # Var(v^T H v) = 2 * sum_{i != j} H_ij^2 for Rademacher v: within 4 standard errors
        off = h - torch.diag(torch.diag(h))
        std = float((2 * off.pow(2).sum() / 200).sqrt())
        assert abs(e - float(h.trace())) <= 4 * std + 1e-6


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return model, [torch.randn(32, 8) for _ in range(2)]


def test_measured_equals_direct_computation():
    model, batches = model_and_data()
    fmts = parse_formats("w2a8,w8a8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = sensitivity(model, ["0", "2"], fmts, batches, progress=False)
    with torch.no_grad():
        ref = [model(b) for b in batches]
    q = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    q.load_state_dict(model.state_dict())
    with torch.no_grad():
        q[2].weight.copy_(rtn_weight(model[2].weight, fmts[0].weight))
        num = sum(float((q(b) - r).pow(2).sum()) for b, r in zip(batches, ref, strict=True))
    den = sum(float(r.pow(2).sum()) for r in ref)
    assert s[1, 0] == pytest.approx(num / den, rel=1e-5)
    assert (s[:, 0] > s[:, 1]).all()  # 2 bits hurt more than 8 bits
    after = model.state_dict()  # the input model is untouched
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_hessian_measure_ranks_like_measured():
    model, batches = model_and_data()
    fmts = parse_formats("w2a8,w3a8,w4a8")
    h = sensitivity(model, ["0", "2"], fmts, batches, measure="hessian", samples=16)
    m = sensitivity(model, ["0", "2"], fmts, batches, progress=False)
    assert (np.diff(h, axis=1) < 0).all() and (np.diff(m, axis=1) < 0).all()
    # second order: the HAWQ-V2 estimate is within a factor of 3 of the measured error
    assert np.all((h / m > 1 / 3) & (h / m < 3))


def test_cache_hits_and_keys(tmp_path):
    model, batches = model_and_data()
    fmts = parse_formats("w2a8,w4a8")
    cache = SensitivityCache(tmp_path / "s.json")
    first = sensitivity(model, ["0", "2"], fmts, batches, cache=cache, progress=False)
    reread = SensitivityCache(tmp_path / "s.json")
    assert len(reread.entries) == 2
    for key in reread.entries:  # poison the cache: a hit must return these values
        reread.entries[key] = {"0": 7.0, "2": 7.0}
    assert (sensitivity(model, ["0", "2"], fmts, batches, cache=reread) == 7.0).all()
    other = [b + 1 for b in batches]  # other data: another key, recomputed
    fresh = sensitivity(model, ["0", "2"], fmts, other, cache=reread, progress=False)
    assert not np.allclose(fresh, first) and (fresh != 7.0).all()
