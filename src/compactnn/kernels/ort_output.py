"""The output of :class:`~compactnn.kernels.ort_nbits.OrtNBitsModel`: the graph's one tensor
(:func:`~compactnn.core.calib.main_output`: a head's ``logits``, else ``last_hidden_state``)
in the model's own output class, so ``out.logits`` (a causal LM) or
``out.last_hidden_state`` (an encoder) work as on the compressed model, and ``out[0]`` is
that tensor as before."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

KEYS = ("logits", "last_hidden_state")  # main_output's order


def output_form(model: nn.Module, example: Any) -> tuple[type, str] | None:
    """``(output class, field)`` of ``model``'s output on ``example`` when it is a Hugging
    Face ``ModelOutput`` holding :data:`KEYS`' tensor; None otherwise (a plain tuple then)."""
    if not isinstance(example, Mapping):
        return None
    with torch.no_grad():
        was = model.training
        try:
            out = model.eval()(**example)
        finally:
            model.train(was)
    if not hasattr(out, "to_tuple"):  # not a transformers ModelOutput
        return None
    for key in KEYS:
        if isinstance(getattr(out, key, None), torch.Tensor):
            return type(out), key
    return None


def wrap_output(tensor: torch.Tensor, form: tuple[type, str] | None) -> Any:
    """``tensor`` as ``form``'s output class (``out.logits``, ``out[0]``), else ``(tensor,)``.

    Example:
        >>> wrap_output(torch.zeros(1), None)
        (tensor([0.]),)
    """
    if form is None:
        return (tensor,)
    cls, key = form
    return cls(**{key: tensor})
