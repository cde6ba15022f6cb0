import torch

from compactnn.quant.twn import TWNWeight, twn_ternary


def test_threshold_and_scale_on_known_weights():
    w = torch.tensor([0.1, -0.5, 0.9, -0.05, 0.3, -1.0])
    codes, alpha = twn_ternary(w)
    # delta = 0.7 * 0.475 = 0.3325; kept -0.5, 0.9, -1.0; alpha = 2.4 / 3
    assert torch.equal(codes, torch.tensor([0.0, -1.0, 1.0, 0.0, 0.0, -1.0]))
    assert torch.isclose(alpha, torch.tensor(0.8))


def test_straight_through_gradient_and_standard_export():
    w = torch.tensor([[0.1, -0.5], [0.9, -1.0]], requires_grad=True)
    wq = TWNWeight()
    out = wq(w)
    assert torch.allclose(out, torch.tensor([[0.0, -0.8], [0.8, -0.8]]))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    exp = wq.export(w)
    assert exp.spec.bits == 2 and exp.spec.symmetric and exp.levels is None
    assert torch.equal(exp.codes, torch.tensor([[0, -1], [1, -1]], dtype=torch.int8))
