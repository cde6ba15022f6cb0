"""Hutchinson traces on models with fused attention and with parameters the loss never reads."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.hessian import hutchinson_trace
from compactnn.errors import CompactnnError


class _Attn(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.fused = fused

    def forward(self, x):
        q, k, v = (p(x).unflatten(-1, (2, 4)).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = q @ k.transpose(-1, -2) / 2.0
            s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
            out = s.softmax(-1) @ v
        return out.transpose(1, 2).flatten(-2)


def _traces(model, x, params):
    return hutchinson_trace(lambda: model(x).pow(2).sum(), params, samples=3)


def test_fused_attention_gives_the_eager_traces():
    x = torch.randn(2, 5, 8)
    fused, eager = _Attn(True), _Attn(False)
    t_fused = _traces(fused, x, [fused.q.weight, fused.k.weight])
    t_eager = _traces(eager, x, [eager.q.weight, eager.k.weight])
    assert torch.allclose(t_fused, t_eager, rtol=1e-4)
    assert (t_fused != 0).all()


def test_a_parameter_the_loss_never_reads_has_trace_zero():
    lin, unused = nn.Linear(3, 2), nn.Linear(3, 2)  # unused: a BERT pooler the loss skips
    x = torch.randn(4, 3)
    t = hutchinson_trace(lambda: lin(x).pow(2).sum(), [lin.weight, unused.weight], samples=2)
    assert t[1] == 0 and t[0] > 0
    # only linear in the loss (zero Hessian): no graph to differentiate, trace 0
    t = hutchinson_trace(lambda: lin(x).sum(), [lin.weight], samples=2)
    assert t.tolist() == [0.0]


def test_an_op_without_second_derivative_is_refused_in_one_line():
    w = torch.ones(1, 2, 4, 4, requires_grad=True)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # no double backward

    def loss():
        return flash(w * 2, w, w)[0].pow(2).sum()

    with pytest.raises(CompactnnError, match=r"measure='measured' \(--measure measured\)") as e:
        hutchinson_trace(loss, [w], samples=1)
    assert "\n" not in str(e.value)
