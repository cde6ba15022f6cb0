"""The layers the first/last-layer convention (``first_last_bits``) raises: the model's first
quantizable layer to run, its last, and every layer whose output *is* one of the model's
outputs (each head of a model that returns a tuple or a dict: a classifier beside an
auxiliary head, a segmentation map beside logits).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compactnn.core.modules import run_order


def run_with_heads(
    model: nn.Module, names: Iterable[str], run: Callable[[nn.Module], Any]
) -> tuple[list[str], set[str]]:
    """Those of ``names`` that run under ``run(model)``, in the order they first run, and
    those whose output tensor is itself one of the model's outputs (``run`` returns the
    model's output; nested tuples, lists and dicts are searched). One run, no copies: a
    layer's output is matched by identity, so ``fc(x)`` returned as is counts and
    ``fc(x).squeeze()`` does not.

    Example:
        >>> class TwoHeads(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.cls = nn.Linear(2, 4), nn.Linear(4, 3)
        ...         self.aux = nn.Linear(4, 1)
        ...     def forward(self, x):
        ...         h = self.body(x)
        ...         return {"logits": self.cls(h), "aux": self.aux(h)}
        >>> m = TwoHeads()
        >>> ran, heads = run_with_heads(m, ["body", "cls", "aux"], lambda m: m(torch.ones(1, 2)))
        >>> ran, sorted(heads)
        (['body', 'cls', 'aux'], ['aux', 'cls'])
    """
    names = list(names)
    wanted = set(names)
    heads: set[str] = set()

    def watched(m: nn.Module) -> Any:
        made: dict[int, tuple[str, weakref.ref]] = {}  # id(output) -> (layer, the output)

        def record(name: str, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                made[id(out)] = (name, weakref.ref(out))

        hooks = [
            mod.register_forward_hook(lambda _m, _a, out, n=n: record(n, out))
            for n, mod in m.named_modules()
            if n in wanted
        ]
        try:
            result = run(m)
        finally:
            for h in hooks:
                h.remove()
        for t in _tensors(result):
            name, ref = made.get(id(t), (None, None))
            if ref is not None and ref() is t:  # the very tensor, not a reused id
                heads.add(name)
        return result

    ran = run_order(model, names, watched)
    return ran, heads


def _tensors(value: Any, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor in a model's output: itself, or nested in tuples, lists and dicts (a
    Hugging Face ``ModelOutput`` is a dict)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 8:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v, depth + 1)]
    return []


def model_ends(quantizable: list[str], ran: list[str], heads: Iterable[str] = ()) -> set[str]:
    """The layers the first/last-layer rule raises: the first and last of a model's
    quantizable layers to run (``ran``, in first-run order; a layer that never runs is
    neither), or the first and last registered (``quantizable``) when none ran (no
    calibration data); and, of those that ran, each layer whose output is one of the
    model's outputs (``heads``, from :func:`run_with_heads`).

    Example:
        >>> sorted(model_ends(["a", "b", "c", "spare"], ["b", "a", "c"]))
        ['b', 'c']
        >>> sorted(model_ends(["a", "b", "c"], []))
        ['a', 'c']
        >>> sorted(model_ends(["a", "cls", "aux"], ["a", "cls", "aux"], {"cls", "aux"}))
        ['a', 'aux', 'cls']
    """
    known = set(quantizable)
    order = [n for n in ran if n in known] or quantizable
    if not order:
        return set()
    return {order[0], order[-1]} | (set(heads) & set(ran) & known)
