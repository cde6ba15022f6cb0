"""Block-by-block calibration of any Hugging Face transformer (encoder or decoder).

Finds the model's repeated blocks (the longest ``nn.ModuleList`` of same-class modules
holding linear layers), captures the first block's inputs with a hook that stops the forward
pass, then walks the blocks one at a time. Only one block's activations live in memory: the
stream fed through the already-quantized blocks (``q_inps``) and the float stream
(``fp_inps``) whose block outputs are the tuning targets. Per block:

1. AWQ scale search (optional), folded into the preceding norm or layer;
2. each linear layer in execution order: collect the input Hessian on ``q_inps`` through the
   partly quantized block, quantize (GPTQ or round-to-nearest), install;
3. tuning of scales and biases against the float block's outputs (optional);
4. both streams advance one block.

Layers outside the blocks (``lm_head``, a pooler) are quantized round-to-nearest afterwards.
"""

from __future__ import annotations

import copy
import resource
from typing import Any

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.modules import set_module
from compactnn.core.qlayers import is_quant_layer, make_quant_layer, quantize_layer_rtn
from compactnn.core.quantize import grouped_view, quantize, scale_zero_from_range
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.quant.base import (
    calibrate_activations,
    layer_specs,
    prepare_model,
    split_supported,
)

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and module of the model's repeated transformer blocks.

    Raises:
        CompactnnError: when the model has no ``ModuleList`` of same-class blocks with linears.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 1:
            continue
        kinds = {type(b) for b in m}
        has_linear = any(isinstance(x, nn.Linear) or _is_hf_conv1d(x) for x in m[0].modules())
        if len(kinds) == 1 and has_linear and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        raise CompactnnError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of identical "
            "layers with linear layers); use a layer-wise method such as rtn."
        )
    return best


def _is_hf_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2


def conv1d_to_linear(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """Replace GPT-2 ``Conv1D`` modules by equivalent ``nn.Linear`` ones (weight transposed)."""
    out = {}
    for name in names:
        c = model.get_submodule(name)
        lin = nn.Linear(c.weight.shape[0], c.weight.shape[1], bias=c.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(c.weight.T)
            if c.bias is not None:
                lin.bias.copy_(c.bias)
        set_module(model, name, lin)
        out[name] = lin
    return out


def capture_block_inputs(
    model: nn.Module, block: nn.Module, ctx: CompressContext
) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of ``block``'s forward for every calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_m, args, kwargs):
        kwargs = dict(kwargs)
        for key, value in kwargs.items():  # a KV cache would grow each time the block re-runs
            if key in _CACHE_KWARGS or type(value).__name__.endswith("Cache"):
                kwargs[key] = None
        args = tuple(None if type(a).__name__.endswith("Cache") else a for a in args)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((_detach(args), _detach(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in ctx.batches:
                try:
                    ctx.run(model, batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
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


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state tensor of a block call."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same block call with its hidden states replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def run_block(
    block: nn.Module,
    call: tuple[tuple, dict],
    hidden: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The block's output hidden states for input ``hidden`` ``(B, T, C)``; ``params``
    replaces some of the block's parameters (``torch.func.functional_call``)."""
    args, kwargs = with_hidden(*call, hidden)
    if params is None:
        out = block(*args, **kwargs)
    else:
        out = torch.func.functional_call(block, params, args, kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _quant_fn(config: Any):
    """The per-layer weight solver: ``solve(layer, hessian, wspec, aspec) -> quant layer``.

    GPTQ configs run GPTQ below 8 bits; every other config rounds to nearest, with clipping
    ranges searched against the Hessian diagonal (the activation-weighted error) when the
    weight spec asks for MSE ranges.
    """
    from compactnn.quant.gptq import GPTQConfig, gptq_quantize, weighted_mse_range

    def solve(layer: nn.Linear, hess: torch.Tensor, wspec: QuantSpec, aspec):
        q = make_quant_layer(layer, wspec, aspec)
        if isinstance(config, GPTQConfig) and wspec.bits < 8:
            codes, scale, zero = gptq_quantize(
                layer.weight, hess, wspec, config.damp, config.act_order, config.block_size
            )
        elif wspec.range_method == "mse" and wspec.granularity != "tensor":
            wg = grouped_view(layer.weight.detach().float(), wspec.granularity, wspec.group_size)
            hdiag = hess.diagonal().reshape(1, wg.shape[1], wg.shape[2])
            lo, hi = weighted_mse_range(wg, wspec.qtype, wspec.symmetric, hdiag)
            scale, zero = scale_zero_from_range(lo, hi, wspec.qtype, wspec.symmetric)
            codes = quantize(wg, scale, zero, wspec.qtype)
        else:
            return quantize_layer_rtn(layer, wspec, aspec)
        q.set_quantized_weight(codes, scale, zero)
        return q

    return solve


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
    from compactnn.quant.gptq import accumulate_hessian

    hess: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(_m, args, local):
        x = args[0]
        if mask[0] is not None and x.dim() == 3 and x.shape[:2] == mask[0].shape:
            x = x[mask[0]]  # (tokens, in): padding tokens left out
        hess[local] = accumulate_hessian(hess.get(local), x)
        if local == group[-1]:
            raise _StopForward

    hooks = [
        block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
        for n in group
    ]
    try:
        with torch.no_grad():
            for call, h in zip(calls, hidden, strict=True):
                mask[0] = token_mask(call, h)
                try:
                    run_block(block, call, h)
                except _StopForward:
                    pass
    finally:
        for hk in hooks:
            hk.remove()
    return hess


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


def check_group_sizes(layers: dict[str, nn.Module], specs: dict) -> None:
    """Fail before any work, naming every layer whose input size the group does not divide."""
    bad = []
    for name, layer in layers.items():
        w = specs[name][0]
        if w.granularity == "group" and layer.in_features % w.group_size:
            bad.append(f"{name} (in_features={layer.in_features})")
    if bad:
        g = specs[next(iter(specs))][0].group_size
        raise CompactnnError(
            f"group_size={g} does not divide the input size of {len(bad)} layer(s): "
            f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; pick a group size that "
            "divides them (e.g. 32, 64 or 128) or leave those layers out of the recipe."
        )


def run_sequential(
    model: nn.Module, targets: dict[str, nn.Module], config: Any, ctx: CompressContext
) -> nn.Module:
    """Quantize ``targets`` block by block (see the module docstring); returns ``model``."""
    prepare_model(model, config, ctx)
    prefix, blocks = find_blocks(model)
    convs = [n for n, m in model.named_modules() if _is_hf_conv1d(m) and n.startswith(prefix)]
    targets = {**targets, **conv1d_to_linear(model, convs)}
    layers = split_supported(targets, ctx)
    specs = layer_specs(model, layers, config, ctx)
    check_group_sizes(layers, specs)
    solve = _quant_fn(config)
    calls = capture_block_inputs(model, blocks[0], ctx)
    q_inps = [hidden_of(*c) for c in calls]
    fp_inps = list(q_inps)
    first_inps = q_inps if getattr(config, "e2e_steps", 0) else None
    e2e = None
    for i in ctx.bar(range(len(blocks)), desc=f"{type(config).__name__} blocks"):
        block = blocks[i]
        name = f"{prefix}.{i}"
        float_block = copy.deepcopy(block)
        with torch.no_grad():
            fp_out = [run_block(float_block, c, h) for c, h in zip(calls, fp_inps, strict=True)]
        if getattr(config, "awq", False):
            from compactnn.quant.awq import awq_block

            awq_block(block, name, specs, calls, q_inps, config)
        bl = _block_layers(block, name, specs)
        quantize_block(block, bl, specs, calls, q_inps, solve)
        if getattr(config, "tune_steps", 0):
            from compactnn.quant.tune import tune_block

            tune_block(
                block, calls, q_inps, fp_out, config.tune_steps, config.tune_lr, ctx.seed,
                rounding=config.tune_rounding,
            )  # fmt: skip
        with torch.no_grad():
            q_inps = [run_block(block, c, h) for c, h in zip(calls, q_inps, strict=True)]
        fp_inps = fp_out
        del float_block
    if first_inps is not None:
        from compactnn.quant.tune import tune_stack

        e2e = tune_stack(
            blocks, calls, first_inps, fp_inps, config.e2e_steps, config.e2e_lr, ctx.seed
        )
    for full, layer in layers.items():  # layers outside the blocks (lm_head, pooler)
        if not full.startswith(prefix + ".") and not is_quant_layer(model.get_submodule(full)):
            wspec, aspec = specs[full]
            set_module(model, full, quantize_layer_rtn(layer, wspec, aspec))
    calibrate_activations(model, ctx)
    ctx.extra.setdefault("calibration", {})[type(config).__name__] = {
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "blocks": len(blocks),
        **({"e2e_relative_error": [round(e, 6) for e in e2e]} if e2e else {}),
    }
    return model
