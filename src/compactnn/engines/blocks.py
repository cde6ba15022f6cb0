"""A model's stacks of repeated blocks, and the calls that run one block at a time.

* :func:`find_blocks`, :func:`find_block_stacks`: the ``nn.ModuleList`` s of same-class
  blocks holding linear layers (a decoder's layers; an encoder's and a decoder's).
* :func:`capture_block_inputs`: the first block's ``(args, kwargs)`` per calibration batch,
  captured by a hook that stops the forward pass there.
* :func:`block_links` and :func:`linked_call`: the inputs a block takes from the outputs of
  the block before it besides the hidden states (T5: the relative position bias only its
  first block computes), learnt once from the model's own forward and passed along by the
  engine, so every block runs on the inputs it gets in the whole model.
* :func:`call_block`, :func:`run_block`: one block on given hidden states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactnn.core.capture import StopForward, capture_batches, run_until_stopped
from compactnn.core.context import CompressContext
from compactnn.core.modules import is_hf_conv1d
from compactnn.errors import CompactnnError

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")

Call = tuple[tuple, dict]  # (args, kwargs) of one block call
Slot = tuple[str, int | str]  # ("arg", position) or ("kwarg", name) of a block call


def _is_block_stack(m: nn.Module) -> bool:
    """An ``nn.ModuleList`` of same-class blocks holding linear layers."""
    if not isinstance(m, nn.ModuleList) or len(m) < 1:
        return False
    has_linear = any(isinstance(x, nn.Linear) or is_hf_conv1d(x) for x in m[0].modules())
    return len({type(b) for b in m}) == 1 and has_linear


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and module of the model's repeated transformer blocks (the longest stack, the
    first of equal ones; :func:`find_block_stacks` gives every stack).

    Raises:
        CompactnnError: when the model has no ``ModuleList`` of same-class blocks with linears.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if _is_block_stack(m) and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        raise CompactnnError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of identical "
            "layers with linear layers); use a layer-wise method such as rtn."
        )
    return best


def find_block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of repeated blocks: :func:`find_blocks`' first, then any other stack
    neither inside nor around one already found (an encoder-decoder model's decoder), in
    the order the model defines them.

    Example:
        >>> [p for p, _ in find_block_stacks(t5)]  # doctest: +SKIP
        ['encoder.block', 'decoder.block']
    """
    main = find_blocks(model)
    stacks = [main]
    for name, m in model.named_modules():
        inside = any(name.startswith(p + ".") or p.startswith(name + ".") for p, _ in stacks)
        if _is_block_stack(m) and not inside and all(m is not s for _, s in stacks):
            stacks.append((name, m))
    names = [n for n, _ in model.named_modules()]
    return sorted(stacks, key=lambda s: names.index(s[0]))


def _is_cache(key: Any, value: Any) -> bool:
    return key in _CACHE_KWARGS or type(value).__name__.endswith("Cache")


def capture_block_inputs(model: nn.Module, block: nn.Module, ctx: CompressContext) -> list[Call]:
    """``(args, kwargs)`` of ``block``'s forward for every calibration batch."""
    captured: list[Call] = []

    def hook(_m, args, kwargs):
        kwargs = dict(kwargs)
        for key, value in kwargs.items():  # a KV cache would grow each time the block re-runs
            if _is_cache(key, value):
                kwargs[key] = None
        args = tuple(None if _is_cache(None, a) else a for a in args)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((_detach(args), _detach(kwargs)))

    capture_batches(model, block, ctx, hook, with_kwargs=True)
    if len(captured) != len(ctx.batches):
        raise CompactnnError("the calibration batches never reached the model's first block.")
    return captured


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def block_links(model: nn.Module, blocks: nn.ModuleList, ctx: CompressContext) -> dict[Slot, int]:
    """The inputs each block after the first takes from the previous block's output tuple:
    input slot -> output position.

    Learnt from one forward pass of the first calibration batch through the first block,
    stopped at the second block's call: an input of that call that *is* (the same tensor
    as) an element of the first block's output is taken, for every later block, from the
    same element of the block before it. T5's encoder: ``{("arg", 2): 1}`` (its
    ``position_bias``, which only the first block computes); its decoder also
    ``{("arg", 5): 2}`` (the cross-attention bias). The hidden states (the engine feeds
    its own streams) and KV caches are left out; a single block or a block returning one
    tensor gives ``{}`` (every block then takes the first block's call).

    Example:
        >>> block_links(t5, t5.encoder.block, ctx)  # doctest: +SKIP
        {('arg', 2): 1}
    """
    if len(blocks) < 2 or not ctx.batches:
        return {}
    seen: dict[str, Any] = {}

    def record_out(_m, _args, out):
        seen["out"] = out

    def record_next(_m, args, kwargs):
        seen["next"] = (args, kwargs)
        raise StopForward

    handles = [
        blocks[0].register_forward_hook(record_out),
        # first, so no other hook (a streamed run loading the block) runs before the stop
        blocks[1].register_forward_pre_hook(record_next, prepend=True, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            run_until_stopped(ctx.run, model, ctx.batches[0])
    finally:
        for h in handles:
            h.remove()
    out = seen.get("out")
    if "next" not in seen or not isinstance(out, (tuple, list)):
        return {}
    args, kwargs = seen["next"]
    hidden: Slot = ("arg", 0) if args else ("kwarg", "hidden_states")
    slots = {("arg", i): a for i, a in enumerate(args)}
    slots.update({("kwarg", k): v for k, v in kwargs.items()})
    links: dict[Slot, int] = {}
    for slot, value in slots.items():
        if slot == hidden or not isinstance(value, torch.Tensor) or _is_cache(slot[1], value):
            continue
        j = next((j for j, o in enumerate(out) if o is value), None)
        if j is not None:
            links[slot] = j
    return links


def linked_call(call: Call, out: Any, links: dict[Slot, int]) -> Call:
    """The first block's ``call`` with each linked input taken from ``out``, the previous
    block's output (see :func:`block_links`); ``call`` itself without links."""
    if not links:
        return call
    args, kwargs = list(call[0]), dict(call[1])
    for (kind, key), j in links.items():
        value = _detach(out[j])
        if kind == "arg" and key < len(args):
            args[key] = value
        elif kind == "kwarg":
            kwargs[key] = value
    return tuple(args), kwargs


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state tensor of a block call."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same block call with its hidden states replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def call_block(
    block: nn.Module,
    call: Call,
    hidden: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
) -> Any:
    """The block's whole output (a tensor or a tuple) for input ``hidden`` ``(B, T, C)``;
    ``params`` replaces some of the block's parameters (``torch.func.functional_call``)."""
    args, kwargs = with_hidden(*call, hidden)
    if params is None:
        return block(*args, **kwargs)
    return torch.func.functional_call(block, params, args, kwargs)


def hidden_out(out: Any) -> torch.Tensor:
    """The output hidden states of a block's output (its first element)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(
    block: nn.Module,
    call: Call,
    hidden: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The block's output hidden states for input ``hidden`` ``(B, T, C)``; ``params``
    replaces some of the block's parameters (``torch.func.functional_call``)."""
    return hidden_out(call_block(block, call, hidden, params))
