"""What ``compactnn.save`` refuses before anything is written: models no artifact can
hold (kernel layers, ``quantize_residuals`` graphs, live parametrizations, third-party layer
classes ``load`` cannot rebuild) and control characters in what compress recorded."""

from __future__ import annotations

from torch import fx, nn
from torch.nn.utils import parametrize

from compactnn import registry
from compactnn.errors import CompactnnError, name_list


def refuse_unsaveable(model: nn.Module) -> None:
    """Raise ``CompactnnError`` naming the layers when no artifact can hold ``model``."""
    _refuse_residual_graph(model)
    _refuse_kernel_model(model)
    _refuse_parametrized(model)
    _refuse_unrebuildable(model)


def _refuse_kernel_model(model: nn.Module) -> None:
    """A ``to_kernels`` model holds kernel layers, which no artifact stores: refuse it before
    anything is written."""
    from compactnn.kernels.swap import KERNEL_TYPES

    found = [name for name, m in model.named_modules() if isinstance(m, KERNEL_TYPES)]
    if found:
        raise CompactnnError(
            f"cannot save a model that runs on compactnn kernels (e.g. {name_list(found, 3)}): "
            "save the compressed model q itself (compactnn.save(q, dir)), then run it on "
            "kernels with compactnn.load(dir, kernels=True)."
        )


def _refuse_parametrized(model: nn.Module) -> None:
    """A layer that still carries ``torch.nn.utils.parametrize`` parametrizations (pruning
    masks of a ``GradualPruner`` / ``DNSPruner`` not yet finished) holds its tensor as
    ``parametrizations.weight.original`` plus a mask, which no skeleton has: refuse it before
    anything is written, naming the layers and the call that bakes the masks."""
    found = [
        (f"{name}.{tensor}" if name else tensor)
        + f" ({', '.join(type(p).__name__ for p in m.parametrizations[tensor])})"
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m)
        for tensor in m.parametrizations
    ]
    if found:
        raise CompactnnError(
            f"cannot save: {name_list(found, 3)} still carry parametrizations. Pruning masks "
            "attached while training (GradualPruner, DNSPruner): call pruner.finish() first, "
            "which bakes them into plain weights with exact zeros (or "
            "compactnn.prune.masks.bake_masks(model)); others (spectral_norm, weight_norm, "
            "your own): torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') "
            "bakes the current weight in."
        )


def _hookless_method_modules(model: nn.Module) -> dict[str, str]:
    """Python module -> method name, for the third-party methods of ``model``'s recipe whose
    module registers no artifact hook (their layers cannot be rebuilt by ``load``)."""
    recipe = (getattr(model, "_compactnn", {}) or {}).get("recipe")
    hooked = {h.__module__ for hooks in registry.ARTIFACT_HOOKS.values() for h in hooks}
    out: dict[str, str] = {}
    for step in getattr(recipe, "steps", ()):
        entry = registry.METHODS.get(step.method)
        where = getattr(getattr(entry, "handler", None), "__module__", None) or ""
        if where and where.split(".")[0] != "compactnn" and where not in hooked:
            out.setdefault(where, step.method)
    return out


def module_classes(model: nn.Module) -> set[type]:
    """The classes of ``model``'s modules (itself included, at any depth)."""
    return {type(m) for m in model.modules()}


def note_new_classes(
    model: nn.Module, known: set[type], made_by: dict[type, str], entry: registry.MethodEntry
) -> None:
    """After ``entry``'s handler ran on ``model``: record in ``made_by`` each module class
    not in ``known`` as made by that method when it is a third-party one (compress's record
    for :func:`refuse_unsaveable`); every new class becomes known."""
    new = module_classes(model) - known
    known |= new
    if registry.plugin_module(entry) is not None:
        made_by.update(dict.fromkeys(new, entry.name))


def _hooked_packages() -> set[str]:
    """Top-level packages of the Python modules that register artifact hooks."""
    return {h.__module__.split(".")[0] for hooks in registry.ARTIFACT_HOOKS.values() for h in hooks}


def _refuse_made_classes(model: nn.Module, made_by: dict[type, str]) -> None:
    """Refuse a module whose class a third-party method put in the model (compress's
    record, at any depth: inside ``nn.Sequential`` too) when no artifact hook of its package
    or of the method's rebuilds it, and the class is neither compactnn's nor torch's."""
    hooked = _hooked_packages()
    for name, m in model.named_modules():
        cls = type(m)
        method = made_by.get(cls)
        if method is None or cls.__module__.split(".")[0] in {"compactnn", "torch", *hooked}:
            continue
        entry = registry.METHODS.get(method)
        where = (registry.plugin_module(entry) if entry is not None else None) or "?"
        if where.split(".")[0] in hooked:
            continue
        raise CompactnnError(
            f"cannot save: {name or 'the model'!r} is a {cls.__qualname__} "
            f"({cls.__module__}), a class method {method!r} ({where}) put in the model, "
            "which load cannot rebuild: load gives back the float skeleton's modules and "
            "compactnn's quantized layers only. Keep the skeleton's module classes in the "
            "method, or register an artifact hook that rebuilds it "
            "(compactnn.registry.register_artifact_hook; docs/architecture.md, "
            "'Artifact hooks')."
        )


def _refuse_unrebuildable(model: nn.Module) -> None:
    """``load`` rebuilds the float skeleton's own modules, compactnn's layers and what
    artifact hooks make. A module whose class a third-party method put in the model without
    an artifact hook that rebuilds it would come back as the skeleton's module (other
    outputs, silently) or not load at all: refuse it before anything is written, naming the
    layer, its class and the method. ``compress`` records the skeleton's classes before any
    handler runs and which classes each step added (``made_by``); a model without that
    record (made some other way) is checked by the classes of each handler's Python module,
    those of the module defining the model's own class taken for the skeleton's."""
    made_by = (getattr(model, "_compactnn", {}) or {}).get("made_by")
    if isinstance(made_by, dict):
        _refuse_made_classes(model, made_by)
        return
    methods = _hookless_method_modules(model)
    methods.pop(type(model).__module__, None)
    if not methods:
        return
    for name, m in model.named_modules():
        cls = type(m)
        if cls.__module__ in methods:
            raise CompactnnError(
                f"cannot save: {name or 'the model'!r} is a {cls.__qualname__}, a class of "
                f"method {methods[cls.__module__]!r} ({cls.__module__}), which load cannot "
                "rebuild: load gives back the float skeleton's modules and compactnn's "
                "quantized layers only. Keep the skeleton's module classes in the method, or "
                "register an artifact hook that rebuilds it "
                "(compactnn.registry.register_artifact_hook; docs/architecture.md, "
                "'Artifact hooks')."
            )


def _refuse_residual_graph(model: nn.Module) -> None:
    """A ``quantize_residuals`` model is a ``torch.fx`` graph with quantizers no float model
    has, so no skeleton rebuilds it: refuse it before anything is written. (Other fx graphs,
    e.g. a ``.pt2`` model lifted by ``compactnn.model_io``, load on the same kind of graph.)"""
    found = [
        name
        for name, m in model.named_modules()
        if isinstance(m, fx.GraphModule) and getattr(m, "residual_grids", None) is not None
    ]
    if found:
        where = "" if found == [""] else f" (its {name_list(found, 3)})"
        raise CompactnnError(
            f"cannot save a model from quantize_residuals{where}: it is a "
            "torch.fx graph with quantizers inserted, which no float skeleton has, so the "
            "artifact could never be loaded. Save the compressed model instead "
            "(compactnn.save(qmodel, path)) and call quantize_residuals again after loading it."
        )


def unprintable(where: str, problem: str) -> CompactnnError:
    """``save``'s error for a control character in what compress recorded (a recipe name, a
    note, an ``extra`` value): the user's input, not a damaged artifact."""
    return CompactnnError(
        f"cannot save: {where} {problem} (a recipe name, note or extra value given to "
        "compress); artifacts refuse control characters, which would drive the terminal of "
        "whoever prints them: remove it and compress again."
    )
