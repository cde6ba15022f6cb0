import torch
from torch import nn

from compactnn.engines.qat import QATLayer
from compactnn.quant.inq import INQWeight, pow2_exponents, pow2_quantize


def test_exponents_follow_the_paper():
    assert pow2_exponents(1.0, 5) == (0, -7)  # n1 = floor(log2(4/3)); 8 magnitudes at 5 bits
    assert pow2_exponents(0.3, 5) == (-2, -9)


def test_nearest_power_of_two_with_ties_upward():
    w = torch.tensor([0.75, 0.74, -0.3, 0.0035, 0.0, 1.2])
    q = pow2_quantize(w, 0, -7)
    # 0.75 is the midpoint of 0.5 and 1 (goes up); 0.0035 < 2**-8, half of 2**-7: -> 0
    assert torch.equal(q, torch.tensor([1.0, 0.5, -0.25, 0.0, 0.0, 1.0]))


def test_frozen_portions_never_change_and_export_is_powers_of_two():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    wq = INQWeight(lin.weight, 5, (0.5, 0.75))
    layer = QATLayer(lin, wq)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x, y = torch.randn(32, 16), torch.randn(32, 8)
    snapshots = []
    for epoch in range(4):
        wq.start_epoch(lin.weight, epoch, 4)
        snapshots.append((wq.frozen.clone(), wq(lin.weight).detach().clone()))
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(layer(x), y).backward()
            opt.step()
        frozen_then, value_then = snapshots[-1]
        now = wq(lin.weight).detach()
        assert torch.equal(now[frozen_then], value_then[frozen_then])
    assert abs(wq.frozen.float().mean().item() - 0.75) < 0.01
    exp = wq.export(lin.weight)
    values = exp.levels.reshape(-1)[exp.codes.long()]
    nz = values[values != 0].abs()
    assert torch.equal(torch.log2(nz), torch.log2(nz).round())  # exact powers of two
    assert torch.equal(values[wq.frozen], wq.frozen_values[wq.frozen])
