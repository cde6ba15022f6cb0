"""The reason an unsplit attention's out_proj stays float names no pruning it did not see."""

from __future__ import annotations

import torch
from torch import nn

from compactnn.api import _leave_attention_out_projs
from compactnn.core.context import CompressContext


def test_an_unsplit_plain_attention_is_not_blamed_on_channel_pruning():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.MultiheadAttention(4, 2), nn.MultiheadAttention(4, 2, add_zero_attn=True)
    )
    targets = dict(net.named_modules())
    ctx = CompressContext(progress=False)
    ctx.warn = lambda message: None
    kept = _leave_attention_out_projs(net, targets, ctx)
    assert "0.out_proj" not in kept and "1.out_proj" not in kept
    assert "the recipe prunes channels" not in ctx.float_layers["0.out_proj"]
    assert "left whole before this step" in ctx.float_layers["0.out_proj"]
    assert ctx.float_layers["1.out_proj"].endswith("(not split: add_zero_attn=True)")
