"""Module targeting and surgery: which layers a step touches, and swapping them in place."""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compactnn.core.fields import check_keys, short_repr
from compactnn.errors import CompactnnError, user_stacklevel

DEFAULT_CLASSES = ("Linear", "Conv1d", "Conv2d")


@dataclass(frozen=True)
class Targets:
    """Which modules a recipe step applies to.

    A module is targeted when its class name (or a base class name) is in ``classes``, its
    qualified name matches one of ``names`` (``fnmatch`` patterns), and it matches none of
    ``ignore``.

    Example:
        >>> Targets(classes=("Linear",), ignore=("lm_head",)).matches("lm_head", nn.Linear(2, 2))
        False
    """

    classes: tuple[str, ...] = DEFAULT_CLASSES
    names: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for attr in ("classes", "names", "ignore"):
            value = getattr(self, attr)
            value = (value,) if isinstance(value, str) else value
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise CompactnnError(
                    f"targets.{attr}={short_repr(value)} must be a string or a list of strings "
                    f"(e.g. {attr}: [{DEFAULT_CLASSES[0] if attr == 'classes' else 'fc*'}])."
                )
            object.__setattr__(self, attr, tuple(value))
        for attr in ("classes", "names"):
            if not getattr(self, attr):
                raise CompactnnError(
                    f"targets.{attr} is empty, so the step would touch no layer; list at "
                    f"least one (default {attr}: {list(getattr(Targets, attr))}) or drop "
                    "the step."
                )

    def name_matches(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in self.ignore):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.names)

    def class_matches(self, module: nn.Module) -> bool:
        names = {c.__name__ for c in type(module).__mro__}
        return bool(names & set(self.classes))

    def matches(self, name: str, module: nn.Module) -> bool:
        return self.class_matches(module) and self.name_matches(name)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Targets:
        """Targets from a recipe mapping with keys ``classes``, ``names``, ``ignore``.

        Example:
            >>> Targets.from_dict({"ignore": "lm_head"}).ignore
            ('lm_head',)
        """
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise CompactnnError(
                f"targets={short_repr(data)} must be a mapping with keys classes, names and ignore "
                "(e.g. targets: {ignore: [lm_head]}); omit it to target every layer."
            )
        return cls(**check_keys(data, ("classes", "names", "ignore"), "targets"))


def select_modules(model: nn.Module, targets: Targets) -> dict[str, nn.Module]:
    """Leaf-most modules of ``model`` that ``targets`` selects, in registration order."""
    return {n: m for n, m in model.named_modules() if n and targets.matches(n, m)}


def check_patterns(model: nn.Module, patterns: Iterable[str], key: str) -> None:
    """Refuse a module name or pattern of ``patterns`` (the recipe's or call's ``key``) that
    matches no module of ``model``; the message lists the closest module names. A
    ``name.*`` pattern (what ``ignore`` adds for the modules inside ``name``) is accepted
    when ``name`` itself matches a module (a leaf has no modules inside)."""
    names = [n for n, _ in model.named_modules() if n]

    def hit(pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)

    for pattern in patterns:
        if hit(pattern) or (pattern.endswith(".*") and hit(pattern[:-2])):
            continue
        close = (
            difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            or list(weight_layers(model))[:5]
        )
        raise CompactnnError(
            f"{key}: {pattern!r} matches no module of the model; close names: "
            f"{', '.join(close) or '(none)'} (module names as in model.named_modules())."
        )


def _layer_class_names() -> set[str]:
    """Names of every layer class known now: torch.nn's and every loaded ``nn.Module``
    subclass (compactnn's quantized layers, the user's own)."""
    known: set[str] = set()
    todo = [nn.Module]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__name__ not in known:
                known.add(sub.__name__)
                todo.append(sub)
    known.update(k for k, v in vars(nn).items() if isinstance(v, type) and issubclass(v, nn.Module))
    return known


def check_classes(model: nn.Module, classes: Iterable[str], key: str = "targets.classes") -> None:
    """Refuse a name of ``classes`` that is no layer class (a typo: the closest names are
    given), and a list of which no class is in ``model`` (the step would target nothing: the
    classes the model has are given). A real class the model lacks next to one it has is
    fine: a recipe is reused across models."""
    present: dict[str, None] = {}
    in_mro: set[str] = set()
    for n, m in model.named_modules():
        if n:
            present[type(m).__name__] = None
            in_mro.update(c.__name__ for c in type(m).__mro__)
    shown = ", ".join(list(present)[:12]) or "(none)"
    missing = [c for c in classes if c not in in_mro]
    if not missing:
        return
    known = _layer_class_names() | in_mro
    for name in missing:  # typos first: they are the likelier mistake
        if name not in known:
            close = difflib.get_close_matches(name, [*present, *sorted(known)], n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(dict.fromkeys(close))}? " if close else ""
            raise CompactnnError(
                f"{key}: {name!r} is not a layer class name; {hint}Use torch.nn class names "
                f"(e.g. Linear, Conv2d); this model has: {shown}."
            )
    if len(missing) == len(set(classes)):
        raise CompactnnError(
            f"{key}: {', '.join(map(repr, missing))} match no module of the model (the model "
            f"has: {shown}); target a class the model has."
        )


def check_target_names(model: nn.Module, recipe: Any) -> None:
    """Refuse a recipe step whose ``targets`` name a module pattern (``names``, ``ignore``)
    or a class (``classes``) that matches no module of ``model``: a typo there would
    silently change which layers are compressed. Default ``names``/``classes`` are not
    checked (a built-in recipe does not list every layer kind a model has)."""
    for step in recipe.steps:
        if step.targets.names != ("*",):
            check_patterns(model, step.targets.names, "targets.names")
        check_patterns(model, step.targets.ignore, "targets.ignore")
        if step.targets.classes != DEFAULT_CLASSES:
            check_classes(model, step.targets.classes)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` with ``new``.

    The user's forward, forward-pre and backward hooks on the module replaced go with it to
    ``new`` when ``new`` stands in for it (:func:`move_hooks`); otherwise they are dropped
    with one warning naming the module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = (
        parent[int(child)]
        if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit()
        else getattr(parent, child, None)
    )
    if isinstance(old, nn.Module) and old is not new and has_hooks(old):
        if is_stand_in(old, new):
            move_hooks(old, new)
        else:
            warnings.warn(
                f"{name!r} ({type(old).__name__}) was replaced by {type(new).__name__}, "
                "which is not its twin: the hooks registered on it are dropped; register "
                "them on the compressed model instead.",
                stacklevel=user_stacklevel(),
            )
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    if isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2"):
        # In eval mode without gradients, PyTorch's encoder layer runs one fused kernel that
        # reads linear1/linear2's weights without calling them, so a compressed layer there
        # would be bypassed (its input quantizer never runs, its float weight is used). The
        # fused path requires this flag; the layer's own forward does not read it.
        parent.activation_relu_or_gelu = parent.activation_relu_or_gelu and type(new) is nn.Linear


# the per-call hooks of a module: the dicts keyed by hook id, handles point at them by weakref
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
# what makes two modules of one kind interchangeable: the sizes their input and output have
_SIGNATURES = (
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels")),
    (nn.Embedding, ("embedding_dim",)),
)


def has_hooks(m: nn.Module) -> bool:
    """True when ``m`` has a forward, forward-pre or backward hook of its own."""
    return any(
        getattr(m, d, None)
        for d in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    )


def _torch_kind(m: nn.Module) -> type:
    """The first torch.nn class of ``m``'s class (``nn.Linear`` for a QuantLinear, or a
    user's subclass of it); ``nn.Module`` for a module of no torch.nn layer class."""
    for cls in type(m).__mro__:
        if cls is not nn.Module and cls.__module__.startswith("torch.nn.modules"):
            return cls
    return nn.Module


def _twin(old: nn.Module, new: nn.Module) -> bool:
    """``new`` is the same kind of layer as ``old``: of its torch.nn class (a QuantLinear for
    a Linear), or a kernel with the same input and output sizes (W8A8Linear for a Linear)."""
    kind = _torch_kind(old)
    if kind is not nn.Module and isinstance(new, kind):
        return True
    for cls, attrs in _SIGNATURES:
        if isinstance(old, cls):
            return all(hasattr(new, a) and getattr(new, a) == getattr(old, a) for a in attrs)
    return False


def is_stand_in(old: nn.Module, new: nn.Module) -> bool:
    """``new`` replaces ``old`` call for call: its twin (:func:`_twin`), a wrapper around it
    (``old`` is inside ``new``), or the twin of the layer a wrapper ``old`` wraps (a QAT
    wrapper frozen to its quantized layer)."""
    if _twin(old, new) or any(m is old for m in new.modules()):
        return True
    return _torch_kind(old) is nn.Module and any(_twin(c, new) for c in old.children())


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the hooks of ``old`` (same entries, order and ids, so a handle the user
    holds still removes its hook) and leave ``old`` with none. ``new`` takes ``old``'s hook
    dicts themselves (a handle holds a weak reference to the dict); hooks ``new`` had
    already run after them."""
    for attr in HOOK_DICTS:
        moved = getattr(old, attr, None)
        if moved is None:
            continue
        mine = getattr(new, attr, None)
        if mine:
            moved.update(mine)
        setattr(new, attr, moved)
        setattr(old, attr, OrderedDict() if isinstance(moved, OrderedDict) else type(moved)())
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


def run_order(model: nn.Module, names: Iterable[str], run: Any) -> list[str]:
    """Those of ``names`` whose modules run under ``run(model)``, in the order they first run
    (a module that never runs is left out)."""
    wanted = set(names)
    order: list[str] = []
    hooks = []
    for n, m in model.named_modules():
        if n in wanted:
            hooks.append(
                m.register_forward_pre_hook(
                    lambda _m, _a, n=n: order.append(n) if n not in order else None
                )
            )
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in hooks:
            h.remove()
    return order


def execution_order(model: nn.Module, names: Iterable[str], run: Any) -> list[str]:
    """Names among ``names`` in the order their modules first run under ``run(model)``;
    those that never run follow in their given order."""
    names = list(names)
    order = run_order(model, names, run)
    ran = set(order)
    return order + [n for n in names if n not in ran]


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules that own a weight matrix or kernel (``weight.dim() >= 2``)."""
    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        # quantized layers own an input quantizer child; they are still weight layers
        owners = [c for c in m.children() if type(c).__name__ != "ActQuantizer"]
        if n and isinstance(w, torch.Tensor) and w.dim() >= 2 and not owners:
            out[n] = m
    return out


def attention_out_projs(model: nn.Module) -> dict[str, str]:
    """The ``out_proj`` Linear of each ``nn.MultiheadAttention`` of ``model`` (its name -> the
    attention's name). The attention reads its weight and bias directly
    (``F.multi_head_attention_forward``) and never calls it, so it never sees its input.

    Example:
        >>> attention_out_projs(nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4)))
        {'0.out_proj': '0'}
    """
    return {
        f"{n}.out_proj" if n else "out_proj": n
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and isinstance(m.out_proj, nn.Linear)
    }


def state_with_metadata(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> OrderedDict:
    """``tensors`` as a state dict carrying ``model``'s ``_metadata`` (each module's
    ``version``), unless ``tensors`` has its own. Files (safetensors, artifacts) store none,
    and some modules' ``_load_from_state_dict`` read it (torchvision's MNASNet refuses a
    state dict without a version).

    Example:
        >>> state_with_metadata(nn.Linear(2, 2), {})._metadata[""]["version"]
        1
    """
    out = OrderedDict(tensors)
    meta = getattr(tensors, "_metadata", None)
    if meta is None:
        meta = getattr(model.state_dict(), "_metadata", None)
    if meta is not None:
        out._metadata = meta
    return out


def is_hf_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2


def conv1d_to_linear(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """Replace GPT-2 ``Conv1D`` modules by equivalent ``nn.Linear`` ones (weight transposed)."""
    out = {}
    for name in names:
        c = model.get_submodule(name)
        shape = c.weight.shape  # no random init: every value is overwritten
        lin = torch.nn.utils.skip_init(
            nn.Linear,
            shape[0],
            shape[1],
            bias=c.bias is not None,
            device=c.weight.device,
            dtype=c.weight.dtype,
        )  # on c's device: a skeleton's meta tensors stay meta
        with torch.no_grad():
            lin.weight.copy_(c.weight.T)
            if c.bias is not None:
                lin.bias.copy_(c.bias)
        for mine, theirs in ((lin.weight, c.weight), (lin.bias, c.bias)):
            if theirs is not None:
                mine.requires_grad_(theirs.requires_grad)
        move_hooks(c, lin)  # the same product: the hooks see the same input and output
        set_module(model, name, lin)
        out[name] = lin
    return out


def saved_layers(
    model: nn.Module, extra: dict, key: str
) -> Iterator[tuple[str, str, nn.Module | None, Any]]:
    """The entries an artifact hook recorded under ``extra[key]`` (layer name -> entry), each
    as ``(name, where, layer, entry)``: ``where`` names the entry for error messages and
    ``layer`` is the skeleton's module of that name (None when there is none). Nothing when
    the key is absent; :class:`~compactnn.errors.ArtifactError` when it is not a mapping.
    The caller checks each entry (the header is untrusted)."""
    from compactnn.errors import ArtifactError

    saved = extra.get(key)
    if not saved:
        return
    if not isinstance(saved, dict):
        raise ArtifactError(f"extra[{key!r}] must map layer names to entries.")
    for name, entry in saved.items():
        try:
            layer = model.get_submodule(name) if isinstance(name, str) else None
        except AttributeError:
            layer = None
        yield name, f"extra[{key!r}][{name!r:.60}]", layer, entry


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block, each back in its own mode
    after it, whatever happens (a forward in train mode would overwrite batch norms' running
    statistics: the caller's model is never changed).

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2)).train()
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training
