"""Integer inputs for a model that computes in floating point, and labels in dict batches.

* :func:`integer_input_refusal`: ``uint8`` pixels or ``int64`` values that reach a linear or
  convolution layer as they are. The float model fails on them with torch's raw message
  ("Input type (unsigned char) and bias type (float) should be the same"), and a simulated
  model takes them silently (its input quantizer casts the codes 0..255 onto a grid
  calibrated on floats), so both compress and deploy refuse them, naming the cast. Found by
  running the model with a pre-hook on those layers (compress: on its own check of the first
  batch), only for a batch that holds an integer tensor: a model whose forward casts its own
  input (``x.float() / 255``), and one that embeds token ids, pass.
* :func:`label_key_hint`: a dict batch holding its labels under a key forward does not take.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

FLOAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


class IntegerInput(Exception):
    """Raised by :func:`integer_hooks`' pre-hook to stop the forward at the first linear or
    convolution layer that got integers: ``(layer name, layer, input)``."""


def is_integer(t: torch.Tensor) -> bool:
    """Whether ``t`` holds integers or booleans (neither floating point nor complex)."""
    return not (t.is_floating_point() or t.is_complex())


def takes_token_ids(model: nn.Module) -> bool:
    """Whether ``model`` reads integer token ids: a Hugging Face model whose main input is
    ``input_ids``, or one whose first module with weights is an ``nn.Embedding``."""
    main = getattr(model, "main_input_name", None)
    if main is not None:
        return main in ("input_ids", "decoder_input_ids")
    first = next((m for m in model.modules() if next(m.parameters(False), None) is not None), None)
    return isinstance(first, nn.Embedding)


@contextmanager
def integer_hooks(model: nn.Module, tensors: list[tuple[str, torch.Tensor]]) -> Iterator[None]:
    """While open, a linear or convolution layer of ``model`` that gets an integer input
    raises :class:`IntegerInput`; installed only when ``tensors`` (a batch's) hold an integer
    one and the model does not read token ids, so the caller's own forward pays nothing else.
    """
    if not any(is_integer(t) for _, t in tensors) or takes_token_ids(model):
        yield
        return

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and is_integer(x):
                raise IntegerInput(name, module, x)

        return hook

    handles = [
        m.register_forward_pre_hook(pre(n))
        for n, m in model.named_modules()
        if isinstance(m, FLOAT_LAYERS)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def cast_for(dtype: torch.dtype) -> str:
    """The cast that makes model inputs of ``dtype``: ``x.float() / 255`` for 8-bit pixels.

    Example:
        >>> cast_for(torch.uint8)[:15], cast_for(torch.int64)[:9]
        ('x.float() / 255', 'x.float()')
    """
    if dtype == torch.uint8:
        return (
            "x.float() / 255 (8-bit pixels scaled to [0, 1], then any normalisation the "
            "model was trained with)"
        )
    return "x.float() (scaled as the model was trained)"


def integer_input_refusal(
    model: nn.Module, tensors: list[tuple[str, torch.Tensor]], run: Callable[[], Any], what: str
) -> str | None:
    """Why ``model`` cannot take the integer tensors of a batch (``tensors``: ``(label,
    tensor)`` of each, as ``core.calib`` lists them; ``run`` runs the model on the batch), or
    None when none reaches a linear or convolution layer as it is (then ``run`` ran only when
    the batch holds an integer tensor). ``what`` names the batch (``"example="``).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 2))
        >>> x = torch.zeros(2, 4, dtype=torch.uint8)
        >>> integer_input_refusal(m, [("", x)], lambda: m(x), "example=")[:40]
        'example= holds uint8 values (shape (2, 4'
    """
    if not any(is_integer(t) for _, t in tensors) or takes_token_ids(model):
        return None
    try:
        with torch.no_grad(), integer_hooks(model, tensors):
            run()
    except IntegerInput as stop:
        return integer_message(model, tensors, stop, what)
    except Exception:  # another fault: the caller's own call reports it
        return None
    return None


def integer_message(
    model: nn.Module, tensors: list[tuple[str, torch.Tensor]], stop: IntegerInput, what: str
) -> str:
    """The refusal for the integer input ``stop`` caught (the batch's tensor it is, named)."""
    name, layer, x = stop.args
    label, t = next(
        ((k, v) for k, v in tensors if v is x),
        next(((k, v) for k, v in tensors if v.dtype == x.dtype), ("", x)),
    )
    dtype = str(t.dtype).removeprefix("torch.")
    return (
        f"{what}{label} holds {dtype} values (shape {tuple(t.shape)}), and "
        f"{type(model).__name__} computes in floating point (they reach its layer {name!r}, "
        f"a {type(layer).__name__}, as they are): pass floats, e.g. {cast_for(t.dtype)}."
    )


def label_key_hint(model: nn.Module, batch: dict) -> str | None:
    """The fix for a dict batch holding its labels under a key (``label``, ``labels``,
    ``target``, ``targets``, ``y``) that ``model.forward`` does not take (a dict batch is
    passed as keywords, ``forward(**batch)``), else None.

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x): return x
        >>> label_key_hint(Net(), {"x": torch.zeros(1), "label": torch.zeros(1)})[:46]
        "'label' holds labels, not an input of Net.forw"
    """
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward Python cannot describe
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    taken = {p.name for p in params}
    keys = [k for k in batch if k in LABEL_KEYS and k not in taken]
    if not keys:
        return None
    rest = [k for k in batch if k not in keys]
    kept = f"{{k: v for k, v in b.items() if k != {keys[0]!r}}}"
    if len(keys) > 1:
        kept = f"{{k: v for k, v in b.items() if k not in {tuple(keys)!r}}}"
    if len(rest) == 1:
        kept = f"b[{rest[0]!r}]"
    return (
        f"{' and '.join(map(repr, keys))} {'hold' if len(keys) > 1 else 'holds'} labels, "
        f"not an input of "
        f"{type(model).__name__}.forward (a dict batch is passed as keywords, "
        f"forward(**batch)): drop it, passing each batch b as {kept}; calib_data also takes "
        "(inputs, labels) pairs, whose labels compress leaves out."
    )
