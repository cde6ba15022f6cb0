import torch

from compactnn.core.qlayers import ActQuantizer
from compactnn.quant.pact import PACTAct, pact_quantize


def test_forward_clips_and_rounds():
    x = torch.tensor([-0.5, 0.2, 0.5, 0.9, 1.5])
    out = pact_quantize(x, torch.tensor(1.0), 0, 3)
    # clamp to [0, 1], steps of 1/3: [0, 0.6, 1.5, 2.7, 3] -> round -> [0, 1, 2, 3, 3]
    assert torch.allclose(out, torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0]) / 3)


def test_gradients_of_x_and_alpha():
    x = torch.tensor([-0.5, 0.2, 0.5, 0.9, 1.5, 2.0], requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    pact_quantize(x, alpha, 0, 3).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    assert float(alpha.grad) == 2.0  # one per input above alpha


def test_signed_grid_matches_actquantizer():
    torch.manual_seed(0)
    x = torch.randn(256) * 2
    aq = PACTAct(4)
    aq.start_observing()
    aq(x)
    aq.finish_observing()
    with torch.no_grad():
        aq.alpha.fill_(1.75)  # step 0.25, fp16-exact
    spec, s, z = aq.export()
    ref = ActQuantizer(spec)
    ref.set_qparams(s, z)
    assert aq.signed and torch.equal(ref(x), aq(x))
