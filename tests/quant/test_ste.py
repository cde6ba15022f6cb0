import torch

from compactnn.core.qlayers import ActQuantizer
from compactnn.quant.ste import STEAct, ste_fake_quant


def test_forward_and_straight_through_gradient():
    x = torch.tensor([-1.0, 0.26, 0.74, 3.0], requires_grad=True)
    out = ste_fake_quant(x, torch.tensor(0.5), torch.tensor(0.0), -2, 1)
    # round(x/0.5) = [-2, 1, 1, 6] -> clamp [-2, 1]
    assert torch.equal(out, torch.tensor([-1.0, 0.5, 0.5, 0.5]))
    out.sum().backward()
    # identity through round; 0 where clamped (the last one; -2 sits on the bound, kept)
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_act_tracks_ema_and_exports():
    aq = STEAct(8, momentum=0.5)
    aq.start_observing()
    aq(torch.tensor([0.0, 2.0]))
    aq.finish_observing()
    aq.train()
    with torch.enable_grad():
        aq(torch.tensor([0.0, 4.0]))
    assert float(aq.hi) == 3.0  # 0.5 * 2 + 0.5 * 4
    aq.eval()  # ranges stay fixed outside training
    x = torch.linspace(-1, 5, 50)
    spec, s, z = aq.export()
    ref = ActQuantizer(spec)
    ref.set_qparams(s, z)
    assert torch.equal(ref(x), aq(x))
