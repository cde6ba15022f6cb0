"""Layer geometry: what rebuilds a resized Linear / Conv / norm / Embedding module.

Structured pruning changes layer shapes. The artifact stores the geometry of every module
whose shape changed (``extra["resized"]``); ``compactnn.load`` rebuilds those modules on a
copy of the *original* skeleton before loading tensors, so the user's code never changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactnn import registry
from compactnn.core.modules import set_module
from compactnn.core.qlayers import conv_kwargs
from compactnn.errors import ArtifactError

_CONV = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}
_BN = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d}
# attributes of attention modules that track the number of heads (Hugging Face names)
HEAD_ATTRS = ("num_attention_heads", "all_head_size", "num_heads", "inner_dim")


def _lists(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def geometry_of(m: nn.Module) -> dict[str, Any] | None:
    """JSON-able constructor arguments of ``m`` (None for module types not handled)."""
    if isinstance(m, nn.Linear):
        g = {"in_features": m.in_features, "out_features": m.out_features}
        return {"kind": "Linear", "bias": m.bias is not None, **g}
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        kind = "Conv2d" if isinstance(m, nn.Conv2d) else "Conv1d"
        return {"kind": kind, **_lists(conv_kwargs(m))}
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return {
            "kind": "BatchNorm2d" if isinstance(m, nn.BatchNorm2d) else "BatchNorm1d",
            "num_features": m.num_features,
            "eps": m.eps,
            "momentum": m.momentum,
            "affine": m.affine,
            "track_running_stats": m.track_running_stats,
        }
    if isinstance(m, nn.LayerNorm):
        return {
            "kind": "LayerNorm",
            "normalized_shape": list(m.normalized_shape),
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
            "bias": m.bias is not None,
        }
    if isinstance(m, nn.Embedding):
        return {
            "kind": "Embedding",
            "num_embeddings": m.num_embeddings,
            "embedding_dim": m.embedding_dim,
            "padding_idx": m.padding_idx,
        }
    return None


def build(geometry: dict[str, Any]) -> nn.Module:
    """An empty module of the saved geometry (weights are loaded afterwards)."""
    g = dict(geometry)
    kind = g.pop("kind")
    if kind == "Linear":
        return nn.Linear(g["in_features"], g["out_features"], bias=g["bias"])
    if kind in _CONV:
        for k in ("kernel_size", "stride", "dilation"):
            g[k] = tuple(g[k])
        if not isinstance(g["padding"], str):
            g["padding"] = tuple(g["padding"])
        return _CONV[kind](**g)
    if kind in _BN:
        return _BN[kind](**g)
    if kind == "LayerNorm":
        g["normalized_shape"] = tuple(g["normalized_shape"])
        return nn.LayerNorm(**g)
    if kind == "Embedding":
        return nn.Embedding(**g)
    raise ArtifactError(f"the artifact names a resized module of unknown kind {kind!r}.")


def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Geometry of every handled module, and head-count attributes of attention modules."""
    out = {}
    for name, m in model.named_modules():
        g = geometry_of(m)
        if g is not None:
            out[name] = g
        attrs = {a: getattr(m, a) for a in HEAD_ATTRS if isinstance(getattr(m, a, None), int)}
        if attrs and name:
            out[name] = {"kind": "attrs", **attrs}
    return out


def changed(before: dict, after: dict) -> dict[str, dict[str, Any]]:
    """Entries of ``after`` that differ from ``before`` (what the artifact must store)."""
    return {n: g for n, g in after.items() if before.get(n) != g}


def check_resized(name: str, target: nn.Module, g: Any) -> None:
    """Refuse a saved geometry that is not a shrunk copy of the skeleton's module.

    Pruning only removes channels, so every saved entry must name the same kind of module
    with the same keys, and no size may exceed the skeleton's: a header edited to build a
    huge module, or to set arbitrary attributes, is refused before anything is allocated.
    """
    where = f"the artifact's resized module {name!r}"
    if not isinstance(g, dict) or not isinstance(g.get("kind"), str):
        raise ArtifactError(f"{where} is not a geometry mapping with a 'kind'.")
    if g["kind"] == "attrs":
        for attr, value in g.items():
            if attr == "kind":
                continue
            old = getattr(target, attr, None)
            if attr not in HEAD_ATTRS or type(value) is not int or type(old) is not int:
                raise ArtifactError(f"{where} sets {attr}={value!r}, not a head-count integer.")
            if not 0 < value <= old:
                raise ArtifactError(f"{where} sets {attr}={value}, beyond the skeleton's {old}.")
        return
    own = geometry_of(target)
    if own is None or own["kind"] != g["kind"] or set(own) != set(g):
        raise ArtifactError(
            f"{where} is a {g['kind']} with fields {sorted(g)}, but the skeleton's module is "
            f"{type(target).__name__}: pass the float model the artifact was made from."
        )
    for key, value in g.items():
        base = own[key]
        if type(base) is int and (type(value) is not int or not 0 < value <= base):
            raise ArtifactError(f"{where}: {key}={value!r} must be an integer in 1..{base}.")
        if type(base) is not int and type(value) is not type(base):
            raise ArtifactError(f"{where}: {key}={value!r} has the wrong type.")


def rebuild_resized(model: nn.Module, resized: dict[str, dict[str, Any]]) -> None:
    """Replace each named module of ``model`` by an empty one of its saved geometry."""
    if not isinstance(resized, dict):
        raise ArtifactError("the artifact's 'resized' entry is not a mapping.")
    for name, g in resized.items():
        try:
            target = model.get_submodule(name)
        except AttributeError as exc:
            raise ArtifactError(f"the skeleton has no module {name!r} to resize: {exc}") from exc
        check_resized(name, target, g)
        if g["kind"] == "attrs":
            for attr, value in g.items():
                if attr != "kind":
                    setattr(target, attr, value)
            continue
        new = build(g)
        new.to(next(iter(target.parameters()), torch.empty(0)).dtype)
        new.train(target.training)  # a fresh module is in training mode (BN would update)
        for alias in aliases_of(model, target):  # ``self.alias = self.b``: one module, two names
            set_module(model, alias, new)


def aliases_of(model: nn.Module, module: nn.Module) -> list[str]:
    """Every name under which ``module`` is registered in ``model``."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


@registry.register_artifact_hook("resize")
def rebuild_resized_from_header(model: nn.Module, extra: dict[str, Any]) -> None:
    """Artifact hook: :func:`rebuild_resized` on the header's ``extra["resized"]``.

    The ``resize`` stage runs before batch-norm folding and the binary blocks' hook: a
    resized layer is rebuilt under its own name, then wrapped.
    """
    rebuild_resized(model, extra.get("resized", {}))
