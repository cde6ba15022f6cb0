import torch

from compactnn.quant.bireal import approx_sign


def polynomial_sign(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real's F(x), written piecewise as in the paper."""
    return torch.where(
        x < -1,
        -torch.ones_like(x),
        torch.where(x < 0, 2 * x + x * x, torch.where(x < 1, 2 * x - x * x, torch.ones_like(x))),
    )


def test_forward_is_sign_and_gradient_is_the_polynomial_derivative():
    x = torch.tensor([-1.5, -0.75, -0.25, 0.0, 0.3, 0.9, 2.0], requires_grad=True)
    out = approx_sign(x)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]))
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    polynomial_sign(x2).sum().backward()  # autograd of F: the reference
    assert torch.allclose(x.grad, x2.grad)
    assert torch.allclose(x.grad, torch.tensor([0.0, 0.5, 1.5, 2.0, 1.4, 0.2, 0.0]))
