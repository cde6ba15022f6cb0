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
    a = torch.tensor(0.8).half().float()  # the scale as the artifact stores it (float16)
    assert torch.equal(out, torch.tensor([[0.0, -1.0], [1.0, -1.0]]) * a)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    exp = wq.export(w)
    assert exp.spec.bits == 2 and exp.spec.symmetric and exp.levels is None
    assert torch.equal(exp.codes, torch.tensor([[0, -1], [1, -1]], dtype=torch.int8))


def test_training_forward_is_exactly_the_frozen_weights():
    """The forward uses the float16 scale the artifact stores (T2 finding 9: logits 0.075
    apart before): codes times the exported scale equal the training weights exactly."""
    w = torch.randn(16, 9, generator=torch.Generator().manual_seed(0))
    wq = TWNWeight()
    exp = wq.export(w)
    assert exp.scale.item() != twn_ternary(w)[1].item()  # alpha is no float16 number
    assert torch.equal(exp.codes.float() * exp.scale, wq(w).detach())
