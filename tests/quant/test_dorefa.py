import torch

from compactnn.core.qlayers import make_quant_layer
from compactnn.quant.dorefa import DoReFaAct, DoReFaWeight, dorefa_weight


def test_weight_formula_on_known_input():
    w = torch.tensor([[0.5, -1.0, 0.1, 0.0]])
    t = torch.tanh(w)
    t = t / (2 * t.abs().max()) + 0.5
    expected = 1.0 * (2 * torch.round(t * 3) / 3 - 1)  # 2 bits, scale max|w| = 1
    assert torch.allclose(dorefa_weight(w, 2), expected)
    assert set(torch.round(dorefa_weight(w, 2) * 3).tolist()[0]) <= {-3.0, -1.0, 1.0, 3.0}


def test_gradient_goes_through_tanh_normalisation():
    w = torch.tensor([[0.5, -1.0, 0.1]], requires_grad=True)
    dorefa_weight(w, 4).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_export_codebook_reproduces_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5)
    wq = DoReFaWeight(3)
    exp = wq.export(lin.weight)
    q = make_quant_layer(lin, exp.spec, None)
    q.set_codebook(exp.levels)
    q.set_quantized_weight(exp.codes, exp.scale, exp.zero)
    ref = wq(lin.weight).detach()
    assert torch.allclose(q.weight, ref, rtol=1e-3, atol=1e-6)  # fp16 codebook
    assert q.weight.unique().numel() <= 5 * 8


def test_activation_clip_is_fixed():
    aq = DoReFaAct(2)
    aq.start_observing()
    aq(torch.tensor([0.0, 3.0]))
    aq.finish_observing()
    out = aq(torch.tensor([0.4, 1.6, 9.0]))
    assert torch.allclose(out, torch.tensor([0.0, 2.0, 3.0]))  # steps of 3/3 = 1
