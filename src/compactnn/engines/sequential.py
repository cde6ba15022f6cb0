"""The block-sequential engine: calibrate any Hugging Face transformer block by block.

Finds the model's repeated blocks (each ``nn.ModuleList`` of same-class modules holding
linear layers: one stack, or an encoder's and a decoder's), captures the first block's inputs
with a hook that stops the forward pass, then walks the blocks one at a time
(:mod:`compactnn.engines.blocks`). A later block's call is the first block's, except for the
inputs the model passes it from the block before (T5's position bias, which only the first
block computes): those come from the quantized previous block's output. Stacks go in
the order they run, each captured once the stacks before it are quantized (a decoder's calls
carry the quantized encoder's states). Only one block's activations live in memory: the
stream fed through the already-quantized blocks (``q_inps``) and the float stream
(``fp_inps``) whose block outputs are the tuning targets. Per block:

1. ``hooks.before_block`` (e.g. AWQ's scale search, folded into the preceding norm or layer);
2. each linear layer in execution order: collect the input Hessian on ``q_inps`` through the
   partly quantized block, then ``hooks.solve_layer`` builds its quantized twin (GPTQ, or
   round-to-nearest with Hessian-weighted clipping);
3. ``hooks.after_block`` (e.g. tuning against the float block's outputs);
4. both streams advance one block.

After the last block of a stack, ``hooks.after_stack`` may tune the whole stack. Layers
outside the stacks (``lm_head``, a pooler) are quantized round-to-nearest afterwards.

Hook interface (:class:`BlockHooks`)::

    solve_layer(layer: nn.Linear, hessian: Tensor (in, in), wspec, aspec) -> quantized layer
    before_block(data: BlockData) -> None        # may change the float block in place
    after_block(data: BlockData) -> None         # the block's layers are quantized now
    after_stack(data: StackData) -> dict         # merged into the calibration record
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from compactnn.core.capture import StopForward, run_until_stopped
from compactnn.core.context import CompressContext
from compactnn.core.gptq_solver import gptq_quantize, weighted_mse_range
from compactnn.core.hessian import accumulate_hessian
from compactnn.core.memory import peak_rss_mib
from compactnn.core.modules import conv1d_to_linear, execution_order, is_hf_conv1d, set_module
from compactnn.core.qlayers import is_quant_layer, make_quant_layer, quantize_layer_rtn
from compactnn.core.quantize import grouped_view, quantize, scale_zero_from_range
from compactnn.core.spec import QuantSpec
from compactnn.engines.blocks import (
    Call,
    Slot,
    block_links,
    call_block,
    capture_block_inputs,
    find_block_stacks,
    find_blocks,
    hidden_of,
    hidden_out,
    linked_call,
    run_block,
)
from compactnn.errors import CompactnnError
from compactnn.quant.base import (
    QuantConfig,
    calibrate_activations,
    check_group_sizes,
    layer_specs,
    prepare_model,
    split_supported,
)

LayerSolver = Callable[[nn.Linear, torch.Tensor, QuantSpec, QuantSpec | None], nn.Module]


@dataclasses.dataclass
class BlockData:
    """One block as the hooks see it.

    Args:
        block: the block, changed in place (its targeted layers float before
            ``solve_layer``, quantized after).
        name: the block's name in the model (``"model.layers.3"``).
        specs: model layer name -> ``(weight spec, activation spec)`` of every target.
        calls: ``(args, kwargs)`` of this block per calibration batch (hidden states are
            replaced per call, see :func:`~compactnn.engines.blocks.run_block`); the first
            block's, with the inputs a block takes from the one before it (T5's position
            bias) from the quantized previous block.
        q_inps: the block's inputs from the quantized model, one ``(B, T, C)`` per batch.
        fp_out: the float block's outputs on the float model's inputs, same shapes.
        seed: the compress call's seed.
    """

    block: nn.Module
    name: str
    specs: dict[str, tuple[QuantSpec, QuantSpec | None]]
    calls: list[Call]
    q_inps: list[torch.Tensor]
    fp_out: list[torch.Tensor]
    seed: int


@dataclasses.dataclass
class StackData:
    """The whole block stack once every block is quantized.

    Args:
        blocks: the quantized blocks.
        calls: ``(args, kwargs)`` of the first block per calibration batch.
        first_inps: the first block's inputs, one ``(B, T, C)`` per batch.
        fp_out: the float stack's outputs on them, same shapes.
        seed: the compress call's seed.
        links: the inputs each later block takes from the previous block's output instead
            of ``calls`` (:func:`~compactnn.engines.blocks.block_links`; T5's position
            bias); pass them along with :func:`~compactnn.engines.blocks.linked_call`.
    """

    blocks: nn.ModuleList
    calls: list[Call]
    first_inps: list[torch.Tensor]
    fp_out: list[torch.Tensor]
    seed: int
    links: dict[Slot, int] = dataclasses.field(default_factory=dict)


def hessian_rtn_solver(
    layer: nn.Linear, hess: torch.Tensor, wspec: QuantSpec, aspec: QuantSpec | None
) -> nn.Module:
    """Round-to-nearest twin of ``layer``; with ``wspec.range_method == "mse"`` (channel or
    group grids) the clipping ranges minimise the error weighted by the Hessian diagonal
    ``hess`` ``(in, in)`` (the activation-weighted error, AWQ's clip search).

    Example:
        >>> q = hessian_rtn_solver(layer, x.T @ x, QuantSpec(bits=4), None)  # doctest: +SKIP
    """
    q = make_quant_layer(layer, wspec, aspec)
    if wspec.range_method != "mse" or wspec.granularity == "tensor":
        return quantize_layer_rtn(layer, wspec, aspec)
    wg = grouped_view(layer.weight.detach().float(), wspec.granularity, wspec.group_size)
    hdiag = hess.diagonal().reshape(1, wg.shape[1], wg.shape[2])
    lo, hi = weighted_mse_range(wg, wspec.qtype, wspec.symmetric, hdiag)
    scale, zero = scale_zero_from_range(lo, hi, wspec.qtype, wspec.symmetric)
    q.set_quantized_weight(quantize(wg, scale, zero, wspec.qtype), scale, zero)
    return q


def gptq_solver(damp: float, act_order: bool, block_size: int) -> LayerSolver:
    """A layer solver running GPTQ below 8 bits (:func:`~compactnn.core.gptq_solver.
    gptq_quantize`), :func:`hessian_rtn_solver` at 8 bits and above.

    Example:
        >>> hooks = BlockHooks(solve_layer=gptq_solver(0.01, True, 128))  # doctest: +SKIP
    """

    def solve(layer: nn.Linear, hess: torch.Tensor, wspec: QuantSpec, aspec):
        if wspec.bits >= 8:
            return hessian_rtn_solver(layer, hess, wspec, aspec)
        q = make_quant_layer(layer, wspec, aspec)
        codes, scale, zero = gptq_quantize(layer.weight, hess, wspec, damp, act_order, block_size)
        q.set_quantized_weight(codes, scale, zero)
        return q

    return solve


@dataclasses.dataclass(frozen=True)
class BlockHooks:
    """How a method runs inside the block-sequential engine (see the module docstring).

    Args:
        solve_layer: builds a layer's quantized twin from its input Hessian.
        before_block: runs on each float block before its layers are quantized.
        after_block: runs on each block once its layers are quantized.
        after_stack: runs once after the last block; returns entries for the calibration
            record (``model._compactnn["extra"]["calibration"]``). The first block's inputs
            are kept for it only when it is set.
    """

    solve_layer: LayerSolver = hessian_rtn_solver
    before_block: Callable[[BlockData], None] | None = None
    after_block: Callable[[BlockData], None] | None = None
    after_stack: Callable[[StackData], dict[str, Any]] | None = None


def _block_layers(
    block: nn.Module, prefix: str, specs: dict[str, tuple]
) -> dict[str, tuple[str, nn.Module]]:
    """Local name -> (model name, module) of the targeted layers inside ``block``."""
    out = {}
    for local, m in block.named_modules():
        full = f"{prefix}.{local}" if local else prefix
        if full in specs and not is_quant_layer(m):
            out[local] = (full, m)
    return out


def layer_groups(block: nn.Module, call: tuple, hidden: torch.Tensor, locals_: list[str]):
    """``locals_`` in execution order, grouped by shared input (q, k, v read one tensor)."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: seen.append((n, args[0])) if n not in dict(seen) else None
        )
        for n in locals_
    ]
    try:
        with torch.no_grad():
            run_block(block, call, hidden)
    finally:
        for hk in hooks:
            hk.remove()
    groups: list[list[str]] = []
    last = None
    for n, x in seen:
        if last is not None and x is last:
            groups[-1].append(n)
        else:
            groups.append([n])
        last = x
    missing = [n for n in locals_ if n not in dict(seen)]
    if missing:
        raise CompactnnError(f"layers {missing} never ran on the calibration data.")
    return groups


def token_mask(call: tuple, hidden: torch.Tensor) -> torch.Tensor | None:
    """``(B, T)`` bool mask of real (non-padding) tokens when the block call carries one."""
    mask = call[1].get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != hidden.shape[1]:
        return None
    keys = mask[:, 0, -1, :] if mask.shape[2] > 1 else mask[:, 0, 0, :]  # (B, T), key axis
    ok = (keys == 0) if mask.dtype != torch.bool else keys
    return ok if ok.any() else None


def collect_hessians(
    block: nn.Module, calls: list, hidden: list[torch.Tensor], group: list[str]
) -> dict[str, torch.Tensor]:
    """Input Hessians ``(in, in)`` of one group of layers; stops each pass after the group."""
    hess: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(_m, args, local):
        x = args[0]
        if mask[0] is not None and x.dim() == 3 and x.shape[:2] == mask[0].shape:
            x = x[mask[0]]  # (tokens, in): padding tokens left out
        hess[local] = accumulate_hessian(hess.get(local), x)
        if local == group[-1]:
            raise StopForward

    hooks = [
        block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
        for n in group
    ]
    try:
        with torch.no_grad():
            for call, h in zip(calls, hidden, strict=True):
                mask[0] = token_mask(call, h)
                run_until_stopped(run_block, block, call, h)
    finally:
        for hk in hooks:
            hk.remove()
    return hess


def block_inputs(
    block: nn.Module, calls: list, hidden: list[torch.Tensor], name: str, max_tokens: int
) -> torch.Tensor:
    """Up to ``max_tokens`` rows ``(N, C)`` of the input of ``block.<name>``, batch by batch.

    Example:
        >>> x = block_inputs(block, calls, q_inps, "mlp.up_proj", 4096)  # doctest: +SKIP
    """
    xs: list[torch.Tensor] = []
    h = block.get_submodule(name).register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    try:
        with torch.no_grad():
            for c, hid in zip(calls, hidden, strict=True):
                run_block(block, c, hid)
                if sum(len(x) for x in xs) >= max_tokens:
                    break
    finally:
        h.remove()
    return torch.cat(xs)[:max_tokens]


def quantize_block(
    block: nn.Module,
    layers: dict[str, tuple[str, nn.Module]],
    specs: dict,
    calls: list,
    q_inps: list[torch.Tensor],
    solve,
) -> None:
    """Quantize ``block``'s layers one input group at a time, in execution order, each group
    seeing the outputs of the groups quantized before it."""
    groups = layer_groups(block, calls[0], q_inps[0], list(layers))
    for group in groups:
        hess = collect_hessians(block, calls, q_inps, group)
        for local in group:
            full, layer = layers[local]
            wspec, aspec = specs[full]
            set_module(block, local, solve(layer, hess[local], wspec, aspec))


def _prepare(model: nn.Module, targets: dict[str, nn.Module], config: QuantConfig, ctx):
    """Fold, find the block stacks, turn GPT-2 ``Conv1D`` into linears, pick layers and
    specs. The stacks come in the order they run, each holding targeted layers; a streamed
    run (:func:`block_stream`) walks :func:`find_blocks`' stack only."""
    prepare_model(model, config, ctx)
    every, streamed = find_block_stacks(model), _STREAM.get() is not None
    stacks = [find_blocks(model)] if streamed else every
    inside = tuple(p + "." for p, _ in stacks)
    convs = [n for n, m in model.named_modules() if is_hf_conv1d(m) and n.startswith(inside)]
    targets = {**targets, **conv1d_to_linear(model, convs)}
    layers = split_supported(targets, ctx)
    specs = layer_specs(model, layers, config, ctx)
    check_group_sizes(layers, specs)
    targeted = [p for p, _ in every if any(n.startswith(p + ".") for n in layers)]
    if streamed and (skipped := [p for p in targeted if p != stacks[0][0]]):
        ctx.warn(
            f"{type(config).__name__}: a streamed run walks one block stack ({stacks[0][0]}); "
            f"the targeted layers of {', '.join(skipped)} are rounded to nearest instead."
        )
    stacks = [(p, b) for p, b in stacks if p in targeted] or [find_blocks(model)]
    if len(stacks) > 1 and ctx.batches:  # e.g. the encoder before the decoder it feeds
        first = execution_order(model, [f"{p}.0" for p, _ in stacks], _run_first_batch(ctx))
        stacks.sort(key=lambda s: first.index(f"{s[0]}.0"))
    return stacks, layers, specs


def _run_first_batch(ctx: CompressContext) -> Callable[[nn.Module], None]:
    return lambda model: ctx.run(model, ctx.batches[0])


class BlockStream(Protocol):
    """Where the blocks' weights come from and where finished blocks go (streamed runs).

    ``resume`` returns the first block to run and the two streams (quantized, float) at its
    input; ``onload`` gives block ``i`` its float weights; ``finish`` receives block ``i``
    quantized, with the streams at the next block's input, and may release the block.
    """

    def resume(self, q_inps: list, fp_inps: list) -> tuple[int, list, list]: ...

    def onload(self, index: int, block: nn.Module) -> None: ...

    def finish(self, index: int, block: nn.Module, q_inps: list, fp_inps: list) -> None: ...


_STREAM: contextvars.ContextVar[BlockStream | None] = contextvars.ContextVar(
    "compactnn_block_stream", default=None
)


@contextlib.contextmanager
def block_stream(stream: BlockStream) -> Iterator[None]:
    """Run the block-sequential engine with ``stream`` loading and releasing each block
    (:mod:`compactnn.streaming`); without it the engine works on the model as it is."""
    token = _STREAM.set(stream)
    try:
        yield
    finally:
        _STREAM.reset(token)


def _walk_blocks(prefix, blocks, specs, calls, links, hooks: BlockHooks, ctx, desc: str):
    """Run every block through the hooks; returns the float stack's outputs.

    ``calls`` are the first block's; each later block's take the inputs named in ``links``
    from the quantized previous block's output (:func:`~compactnn.engines.blocks.
    linked_call`)."""
    q_inps = [hidden_of(*c) for c in calls]
    fp_inps = list(q_inps)
    block_calls = calls
    stream, start = _STREAM.get(), 0
    if stream is not None:
        start, q_inps, fp_inps = stream.resume(q_inps, fp_inps)
        if start and links:
            ctx.warn(
                f"a resumed run starts at {prefix}.{start} without the inputs it takes from "
                f"the block before it ({', '.join(f'{k} {n}' for k, n in links)}); it gets "
                "the first block's instead."
            )
    for i in ctx.bar(range(start, len(blocks)), desc=desc, initial=start, total=len(blocks)):
        block = blocks[i]
        if stream is not None:
            stream.onload(i, block)
        float_block = copy.deepcopy(block)
        pairs = list(zip(block_calls, fp_inps, strict=True))
        with torch.no_grad():
            fp_out = [run_block(float_block, c, h) for c, h in pairs]
        data = BlockData(block, f"{prefix}.{i}", specs, block_calls, q_inps, fp_out, ctx.seed)
        if hooks.before_block is not None:
            hooks.before_block(data)
        bl = _block_layers(block, data.name, specs)
        quantize_block(block, bl, specs, block_calls, q_inps, hooks.solve_layer)
        if hooks.after_block is not None:
            hooks.after_block(data)
        with torch.no_grad():
            outs = [call_block(block, c, h) for c, h in zip(block_calls, q_inps, strict=True)]
        q_inps = [hidden_out(o) for o in outs]
        block_calls = [linked_call(c, o, links) for c, o in zip(calls, outs, strict=True)]
        fp_inps = fp_out
        del float_block, data, outs
        if stream is not None:
            stream.finish(i, block, q_inps, fp_inps)
    return fp_inps


def run_sequential(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: QuantConfig,
    ctx: CompressContext,
    hooks: BlockHooks,
) -> nn.Module:
    """Quantize ``targets`` block by block (see the module docstring); returns ``model``.

    Args:
        model: a Hugging Face transformer (already a copy), changed in place.
        targets: name -> module chosen by the step.
        config: weight/activation specs, first/last-layer convention; its type names the
            calibration record.
        ctx: calibration batches and bookkeeping.
        hooks: the method's solver and block hooks.

    Example:
        >>> run_sequential(model, targets, config, ctx, BlockHooks())  # doctest: +SKIP
    """
    stacks, layers, specs = _prepare(model, targets, config, ctx)
    name = type(config).__name__
    records: dict[str, dict[str, Any]] = {}
    for prefix, blocks in stacks:  # an encoder-decoder: the decoder sees the quantized encoder
        calls = capture_block_inputs(model, blocks[0], ctx)
        links = block_links(model, blocks, ctx)  # e.g. T5's position bias from block 0 on
        first_inps = [hidden_of(*c) for c in calls] if hooks.after_stack is not None else None
        desc = f"{name} blocks" + (f" ({prefix})" if len(stacks) > 1 else "")
        fp_out = _walk_blocks(prefix, blocks, specs, calls, links, hooks, ctx, desc)
        records[prefix] = {"blocks": len(blocks)}
        if first_inps is not None:
            stack = StackData(blocks, calls, first_inps, fp_out, ctx.seed, links)
            records[prefix].update(hooks.after_stack(stack))
    inside = tuple(p + "." for p, _ in stacks)
    for full, layer in layers.items():  # layers outside the stacks (lm_head, pooler)
        if not full.startswith(inside) and not is_quant_layer(model.get_submodule(full)):
            wspec, aspec = specs[full]
            set_module(model, full, quantize_layer_rtn(layer, wspec, aspec))
    calibrate_activations(model, ctx)
    nblocks = sum(r["blocks"] for r in records.values())
    record = next(iter(records.values())) if len(records) == 1 else {"stacks": records}
    ctx.extra.setdefault("calibration", {})[name] = {**record, "blocks": nblocks}
    label = _method_label(config)  # the user's word ("gptq"), not the config class
    peak = round(peak_rss_mib(), 1)  # the process's peak up to the end of this step; not saved
    ctx.measured.setdefault("peak_rss_mib", {})[label] = peak
    ctx.notes.append(f"{label}: calibrated {nblocks} blocks one at a time")  # no measurement
    return model


def _method_label(config: Any) -> str:
    """The registered method name of ``config`` (``"gptq"``), else its class name."""
    from compactnn.registry import METHODS_BY_CONFIG

    entry = METHODS_BY_CONFIG.get(type(config))
    return entry.name if entry is not None else type(config).__name__
