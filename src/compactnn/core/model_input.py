"""The model object a user hands to compactnn, as the entry points take it.

* :func:`unwrap_model`: the module inside a ``torch.compile`` wrapper (``_orig_mod``) or
  ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``). The wrappers own no
  weights of their own, but every module name and the recorded model class would carry the
  wrapper (batch norms were found by no fold pattern, the artifact loaded only onto the
  wrapper, deploy's tracer failed inside it), so the model inside is compressed, once warned.
* :func:`working_copy`: the copy compactnn compresses, legacy ``torch.nn.utils.weight_norm``
  / ``spectral_norm`` folded into plain weights; also for such a model with no forward run
  yet (its ``weight`` is then a tensor computed with autograd, which ``deepcopy`` refuses).
* :func:`check_scripted`: a TorchScript module refused, named with the fix.
* :func:`tied_groups` / :func:`untied_message`: weight layers that share one weight
  Parameter, and the warning when compress gave them separate quantized copies.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from compactnn.core.qlayers import is_quant_layer
from compactnn.errors import CompactnnError, first_line, name_list, user_stacklevel

__all__ = ["check_scripted", "hooked_modules", "tied_groups", "untied_message", "unwrap_model"]
__all__ += ["warn_hooks_not_run", "working_copy"]


def _inner(model: nn.Module) -> tuple[nn.Module, str, str] | None:
    """The module ``model`` wraps, the wrapper's name and the attribute that reaches it."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once torch.compile ran
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod, "torch.compile's wrapper", "_orig_mod"
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, parallel):
        return model.module, f"nn.{type(model).__name__}", "module"
    return None


def unwrap_model(model: nn.Module, doing: str = "compressing") -> nn.Module:
    """The module inside ``model``'s ``torch.compile`` / ``nn.DataParallel`` /
    ``DistributedDataParallel`` wrappers (nested ones too), with one warning saying so;
    ``model`` itself when it is not wrapped.

    Example:
        >>> inner = nn.Linear(2, 2)
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     unwrap_model(nn.DataParallel(inner)) is inner
        True
        >>> str(caught[0].message)[:60]
        'compressing the model inside nn.DataParallel (model.module);'
    """
    wrappers, path = [], "model"
    while (found := _inner(model)) is not None:
        model, wrapper, attr = found
        wrappers.append(wrapper)
        path += f".{attr}"
    if wrappers:
        how = "compile or wrap it again" if len(wrappers) > 1 else _again(wrappers[0])
        warnings.warn(
            f"{doing} the model inside {' inside '.join(wrappers)} ({path}); the result is a "
            f"plain module: {how} if you want.",
            stacklevel=user_stacklevel(),
        )
    return model


def check_scripted(model: nn.Module) -> None:
    """Refuse a TorchScript module: its submodules are RecursiveScriptModules, which no
    recipe finds as layers (it was told to rewrite them as nn.Linear). Moved from
    ``compactnn.api``."""
    if isinstance(model, torch.jit.ScriptModule):
        raise CompactnnError(
            f"the model is a TorchScript module ({type(model).__name__}, from torch.jit.script "
            "or torch.jit.trace), whose layers compactnn cannot replace: pass the nn.Module "
            "before scripting (compress it, then script or export the result)."
        )


def _again(wrapper: str) -> str:
    return "compile it again" if wrapper.startswith("torch.compile") else "wrap it again"


def working_copy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model compactnn works on: a deep copy of ``model`` (``model`` itself with
    ``inplace``) whose legacy ``torch.nn.utils.weight_norm`` / ``spectral_norm`` layers hold
    their weight as a plain Parameter, the value their forward computes in eval mode
    (``remove_weight_norm`` / ``remove_spectral_norm``): their pre-forward hooks would
    otherwise follow the layer a compressed one replaces and look for ``weight_g`` there.
    ``model`` is copied even with such a layer and no forward run yet (its ``weight`` is
    then computed with autograd, which ``deepcopy`` refuses) and keeps its own tensors.

    Raises:
        CompactnnError: another tensor attribute computed with autograd (neither a parameter
            nor a buffer), named with the fix.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     m = nn.utils.weight_norm(nn.Linear(3, 2))
        >>> sorted(n for n, _ in working_copy(m).named_parameters())
        ['bias', 'weight']
        >>> sorted(n for n, _ in m.named_parameters())
        ['bias', 'weight_g', 'weight_v']
    """
    work = model if inplace else _deepcopy(model)
    for module in work.modules():
        for hook in _legacy_norms(module):
            if isinstance(hook, WeightNorm):
                nn.utils.remove_weight_norm(module, hook.name)
            else:
                nn.utils.remove_spectral_norm(module, hook.name)
    return work


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy``; each legacy norm's computed weight is detached for the time of the
    copy (the copy recomputes it from the copied parameters)."""
    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for name, module in model.named_modules():
            normed = {h.name for h in _legacy_norms(module)}
            for attr, value in list(vars(module).items()):
                if not isinstance(value, torch.Tensor) or value.is_leaf:
                    continue
                if attr not in normed:
                    raise CompactnnError(_non_leaf_message(name, attr))
                saved.append((module, attr, value))
                setattr(module, attr, value.detach())
        try:
            return copy.deepcopy(model)
        except RuntimeError as exc:  # e.g. such a tensor in a list or dict attribute
            if "deepcopy" not in str(exc):
                raise
            raise CompactnnError(
                f"the model could not be copied ({first_line(exc, 120)}): keep tensors computed "
                "with autograd out of its attributes (compute them inside forward)."
            ) from exc
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _legacy_norms(module: nn.Module) -> list[WeightNorm | SpectralNorm]:
    hooks = module._forward_pre_hooks.values()
    return [h for h in hooks if isinstance(h, (WeightNorm, SpectralNorm))]


def _non_leaf_message(module: str, attr: str) -> str:
    where = f"{module}.{attr}" if module else attr
    return (
        f"model attribute {where!r} is a tensor computed with autograd (neither a parameter "
        "nor a buffer), which cannot be copied: compute it inside forward, or register it as "
        "a buffer (detached) or an nn.Parameter."
    )


def tied_groups(layers: dict[str, nn.Module]) -> list[list[str]]:
    """The names of ``layers`` (weight layers; embedding tables left out: compress shares
    their codes with a tied head itself) that share one weight Parameter, in groups."""
    groups: dict[int, list[str]] = {}
    for name, module in layers.items():
        if not isinstance(module, nn.Embedding):
            groups.setdefault(id(module.weight), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def untied_message(model: nn.Module, groups: list[list[str]]) -> str | None:
    """The warning for the ``groups`` of tied layers that compress gave separate quantized
    weights (at least one of them quantized, their weights no longer one tensor); None when
    every group stayed tied."""
    modules = dict(model.named_modules())
    parts, differ = [], False
    for names in groups:
        layers = [modules.get(n) for n in names]
        if any(m is None for m in layers) or not any(is_quant_layer(m) for m in layers):
            continue
        if len({id(m.weight) for m in layers}) == 1:
            continue
        formats = [getattr(m, "format", "float") for m in layers]
        each = ", ".join(f"{n}: {f}" for n, f in zip(names, formats, strict=True))
        apart = len(set(formats)) > 1
        differ |= apart
        parts.append(f"{' and '.join(names)} ({each}{'; formats differ' if apart else ''})")
    if not parts:
        return None
    fix = (
        " Where formats differ their values differ too; to give tied layers one format, set "
        "first_last_bits: null in the step's config when the first/last-layer rule sets one apart."
    )
    return (
        f"tied weights: {name_list(parts, 3)} share one weight Parameter in the float model; "
        "compress quantizes each layer on its own, so the result holds (and save stores) a "
        f"separate quantized copy per layer, no longer tied.{fix if differ else ''}"
    )


def hooked_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` with hooks of their own (``""``: the model itself).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> _ = net[0].register_forward_hook(lambda m, i, o: o)
        >>> hooked_modules(net)
        ['0']
    """
    from compactnn.core.modules import has_hooks

    return [name for name, m in model.named_modules() if has_hooks(m)]


def warn_hooks_not_run(model: nn.Module, where: str) -> None:
    """One warning when ``model`` has hooks that ``where`` (a traced or exported program)
    will not run."""
    if hooked := hooked_modules(model):
        names = name_list([n or "the model itself" for n in hooked], 5)
        warnings.warn(
            f"the hooks on {names} do not run in {where}; apply what they do around it "
            "(or before compressing).",
            stacklevel=user_stacklevel(),
        )
