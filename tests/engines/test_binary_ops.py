"""``engines/binary_ops.py``: the elementwise pieces split out of ``engines/binary.py``."""

import torch

from compactnn.engines import binary, binary_ops


def test_split_module_keeps_the_public_names():
    for name in ("sign_pm1", "SignSTE", "sign_ste", "approx_sign_grad", "ApproxSign",
                 "approx_sign", "binary_weight", "xnor_scale", "rprelu", "RPReLU"):  # fmt: skip
        assert getattr(binary, name) is getattr(binary_ops, name)


def test_approx_sign_gradient_matches_autograd_of_the_polynomial():
    # Bi-Real's F(x) = 2x + x^2 (-1 <= x < 0), 2x - x^2 (0 <= x < 1), +-1 outside
    x = torch.linspace(-1.5, 1.5, 31, dtype=torch.float64, requires_grad=True)
    poly = torch.where(x < 0, 2 * x + x**2, 2 * x - x**2)
    f = torch.where(x.abs() >= 1, torch.sign(x), poly)
    (expected,) = torch.autograd.grad(f.sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    out = binary_ops.approx_sign(x2)
    out.sum().backward()
    assert torch.equal(out, torch.where(x2 >= 0, 1.0, -1.0).to(out.dtype))
    assert torch.allclose(x2.grad, expected, atol=1e-12)
