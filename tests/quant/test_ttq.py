import torch

from compactnn.quant.ttq import TTQWeight, ttq_quantize


def _fp16(v: float) -> float:
    return torch.tensor(v).half().float().item()


def test_forward_and_gradients_follow_the_paper():
    w = torch.tensor([1.0, 0.05, -0.3, 0.4, -0.08], requires_grad=True)
    wp = torch.tensor(0.7, requires_grad=True)
    wn = torch.tensor(0.4, requires_grad=True)
    out = ttq_quantize(w, wp, wn, 0.1)  # delta = 0.1 * max|w| = 0.1
    p, n = _fp16(0.7), _fp16(0.4)  # the scales' values as the artifact stores them
    assert torch.equal(out, torch.tensor([p, 0.0, -n, p, 0.0]))
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out.backward(g)
    assert torch.allclose(wp.grad, torch.tensor(1.0 + 4.0))  # sum over w > delta
    assert torch.allclose(wn.grad, torch.tensor(-3.0))  # minus sum over w < -delta
    assert torch.allclose(w.grad, torch.tensor([p, 2.0, 3 * n, 4 * p, 5.0]))


def test_export_codebook_holds_both_scales():
    w = torch.tensor([[1.0, 0.05], [-0.3, 0.4]])
    wq = TTQWeight(w, 0.1)
    with torch.no_grad():
        wq.wp.fill_(0.75)
        wq.wn.fill_(0.5)
    exp = wq.export(w)
    levels = exp.levels.reshape(-1)
    assert torch.equal(levels[exp.codes.long()], wq(w).detach())


def test_training_forward_is_exactly_the_frozen_weights():
    """The learned scales are rounded to float16 in the forward as the artifact stores them:
    0.7 and 0.4 are not float16 numbers (T2 finding 9: logits 0.14 apart before)."""
    w = torch.tensor([[1.0, 0.05], [-0.3, 0.4]])
    wq = TTQWeight(w, 0.1)
    with torch.no_grad():
        wq.wp.fill_(0.7)
        wq.wn.fill_(0.4)
    exp = wq.export(w)
    assert torch.equal(exp.levels.reshape(-1)[exp.codes.long()], wq(w).detach())
