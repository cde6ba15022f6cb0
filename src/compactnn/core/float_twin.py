"""The float twin of a simulated model: every quantizer off, plain float layers on its
dequantized weights (:mod:`compactnn.deployment.float_check` re-exports it)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import skip_init

from compactnn.core.modules import set_module
from compactnn.core.qlayers import ActQuantizer, conv_kwargs, is_quant_layer


def float_model(sim: nn.Module) -> nn.Module:
    """The simulated model with every quantizer off: plain float layers on its dequantized
    weights (same speed as the float network), for timing the float paths beside int8.
    Draws no random numbers (the layers are built uninitialised).

    Example:
        >>> float_model(qmodel)(images).shape  # doctest: +SKIP
        torch.Size([8, 10])
    """
    model = copy.deepcopy(sim).eval()
    done: list[str] = []
    for name, m in list(model.named_modules()):
        if any(name.startswith(d + ".") for d in done):
            continue  # inside a layer already replaced
        if is_quant_layer(m):
            # skip_init: built uninitialised (no random numbers drawn from the caller's
            # stream), then given the dequantized weights below
            if isinstance(m, nn.Linear):
                plain = skip_init(nn.Linear, m.in_features, m.out_features, m.bias is not None)
            else:
                kind = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Conv1d
                plain = skip_init(kind, **conv_kwargs(m))
            with torch.no_grad():
                plain.weight.copy_(m.weight.detach().float())
                if m.bias is not None:
                    plain.bias.copy_(m.bias.detach().float())
            set_module(model, name, plain)
            done.append(name)
        elif isinstance(m, ActQuantizer) and name:
            set_module(model, name, nn.Identity())
    return model
