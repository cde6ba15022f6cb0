import torch

from compactnn.quant.reactnet import RPReLU, rprelu_reference


def test_rprelu_matches_shifted_prelu():
    torch.manual_seed(0)
    m = RPReLU(3)
    with torch.no_grad():
        m.gamma.copy_(torch.tensor([0.1, -0.2, 0.3]))
        m.zeta.copy_(torch.tensor([0.5, 0.0, -0.5]))
        m.slope.copy_(torch.tensor([0.1, 0.25, 0.5]))
    y = torch.randn(2, 3, 4, 4)
    assert torch.allclose(m(y), rprelu_reference(y, m.gamma, m.zeta, m.slope))
    assert torch.allclose(m(torch.full((1, 3, 1, 1), 0.1)).flatten()[0], torch.tensor(0.5))
