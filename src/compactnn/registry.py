"""The one registry: config type -> method (name, handler), plus short-name grammars.

Each method file registers itself with ``@register("name", NameConfig)`` on its handler.
:mod:`compactnn.methods` imports every method file once (the API imports it, so the registry
is full before any recipe runs); nothing is discovered implicitly. The registry imports no
method at import time; a lookup by name that misses (:func:`get_method`, and
:func:`compactnn.recipe.resolve_recipe` before it reads a name) first imports that catalog
by its name (:func:`load_builtins`), the way a plugin system loads its entry points: a
plain ``import compactnn`` imports its parts on first use, and ``compactnn.recipe`` used
straight after it must still see the built-in methods.

The config type is the primary key: a config object names its method by its type alone
(:func:`method_for_config`), so a config can never run under another method's handler. Names
stay unique too; recipes, short names and the CLI look methods up by name
(:func:`get_method`).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compactnn.core.config import MethodConfig
from compactnn.core.fields import short_repr
from compactnn.errors import CompactnnError


@dataclass(frozen=True)
class MethodEntry:
    """A registered method.

    Args:
        name: the method's name in recipes and short names (``"gptq"``).
        config_cls: its frozen config dataclass; registered for this method only.
        handler: ``handler(model, targets, config, ctx) -> model``.
        summary: one line for ``compactnn recipes``.
        version: format version of ``config_cls``'s fields (its ``config_version``, 1 when
            the class does not set one); a saved recipe newer than this is refused.
    """

    name: str
    config_cls: type
    handler: Callable[..., Any]
    summary: str
    version: int = 1


@dataclass(frozen=True)
class ShortNameRule:
    pattern: re.Pattern[str]
    build: Callable[[re.Match[str]], Any]
    form: str
    examples: tuple[str, ...]


class UnknownMethodError(CompactnnError):
    """A recipe or artifact names a method that is not registered (``name``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


METHOD_NAME = re.compile(r"[a-z][a-z0-9_]*")
# Names the short-name grammars read as something else (pattern -> what they mean there):
# a method registered under one of them could never be picked by a short name.
RESERVED_NAMES: dict[re.Pattern[str], str] = {}
METHODS_BY_CONFIG: dict[type, MethodEntry] = {}  # the primary index: config type -> method
METHODS: dict[str, MethodEntry] = {}  # the same entries by name, for recipes and short names
SHORT_NAMES: list[ShortNameRule] = []
# Artifact hooks: how a method's saved structure is rebuilt on a float skeleton at load time.
ARTIFACT_STAGES = ("resize", "before_layers", "after_layers")
ARTIFACT_HOOKS: dict[str, list[Callable[[Any, dict[str, Any]], None]]] = {
    stage: [] for stage in ARTIFACT_STAGES
}


def config_version(config_cls: type) -> int:
    """The format version a config class declares (``config_version``; 1 when unset).

    Example:
        >>> from compactnn.quant.rtn import RTNConfig
        >>> config_version(RTNConfig)
        1
    """
    version = getattr(config_cls, "config_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CompactnnError(
            f"{config_cls.__name__}.config_version={version!r} must be a positive integer; "
            "start at 1 and add 1 whenever the meaning of a saved field changes."
        )
    return version


def reserve_method_names(pattern: str, meaning: str) -> None:
    """Refuse method names that fully match ``pattern``: a short-name grammar reads them as
    ``meaning`` (e.g. ``g\\d+``: ``w4-g32`` is a group size), so the method would be shadowed."""
    RESERVED_NAMES[re.compile(pattern)] = meaning


def check_method_name(name: Any) -> None:
    """Refuse a method name that recipes and short names could not use unambiguously.

    Example:
        >>> check_method_name("pow2")
        >>> check_method_name("My-Method")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        compactnn.errors.CompactnnError: method name 'My-Method' must be lowercase ...
    """
    if not isinstance(name, str) or not METHOD_NAME.fullmatch(name):
        fix = re.sub(r"[^a-z0-9_]+", "_", str(name).lower()).strip("_") or "my_method"
        fix = fix if fix[0].isalpha() else f"m_{fix}"
        raise CompactnnError(
            f"method name {name!r} must be lowercase letters, digits and underscores, "
            f"starting with a letter (e.g. {fix!r}), so short names such as w4-<method> can "
            "name it."
        )
    for pattern, meaning in RESERVED_NAMES.items():
        if pattern.fullmatch(name):
            raise CompactnnError(
                f"method name {name!r} is taken by the short-name grammar ({meaning}): a "
                "short name would never pick this method; choose another name."
            )


def _check_new(name: str, config_cls: type) -> None:
    """Refuse a registration that would make a name or a config type ambiguous, or whose
    config cannot be built with no arguments (``Cfg()``: a YAML step may omit its config)."""
    check_method_name(name)
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise CompactnnError(
            f"method {name!r}: config_cls must be a MethodConfig subclass, got {config_cls!r}."
        )
    if not dataclasses.is_dataclass(config_cls):
        raise CompactnnError(
            f"method {name!r}: {config_cls.__name__} must be a frozen dataclass "
            "(@dataclasses.dataclass(frozen=True))."
        )
    missing = [
        f.name
        for f in dataclasses.fields(config_cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise CompactnnError(
            f"method {name!r}: {config_cls.__name__}() must work with no arguments, but "
            f"field(s) {', '.join(missing)} have no default; give every field a default."
        )
    try:
        config_cls()
    except CompactnnError as exc:
        raise CompactnnError(
            f"method {name!r}: {config_cls.__name__}() must work with no arguments, but its "
            f"defaults are refused ({exc}); give every field a valid default."
        ) from exc
    if name in METHODS:
        raise CompactnnError(
            f"method {name!r} is registered twice ({METHODS[name].config_cls.__name__} and "
            f"{config_cls.__name__}); pick another name."
        )
    if config_cls in METHODS_BY_CONFIG:
        raise CompactnnError(
            f"{config_cls.__name__} is already the config of method "
            f"{METHODS_BY_CONFIG[config_cls].name!r}; give {name!r} a config type of its own "
            "(a frozen dataclass subclass)."
        )


def register(name: str, config_cls: type, summary: str = "") -> Callable:
    """Decorator: register ``handler(model, targets, config, ctx) -> model`` for ``name``.

    Args:
        name: the method's unique name.
        config_cls: its config dataclass, a type no other method uses.
        summary: one line for ``compactnn recipes`` (default: the handler's first doc line).

    Raises:
        CompactnnError: ``name`` or ``config_cls`` is registered already; ``name`` is not
            ``[a-z][a-z0-9_]*`` or is a word of a short-name grammar (``mse``, ``g32``);
            ``config_cls`` is not a MethodConfig dataclass that builds with no arguments.

    Example:
        >>> @register("mymethod", MyConfig, "what it does")  # doctest: +SKIP
        ... def apply_mymethod(model, targets, config, ctx):
        ...     return model
    """

    def deco(handler: Callable) -> Callable:
        _check_new(name, config_cls)
        doc = (handler.__doc__ or "").strip().splitlines()
        entry = MethodEntry(
            name,
            config_cls,
            handler,
            summary or (doc[0] if doc else ""),
            config_version(config_cls),
        )
        config_cls.method_name = name
        METHODS_BY_CONFIG[config_cls] = entry
        METHODS[name] = entry
        return handler

    return deco


def register_short_name(pattern: str, form: str, examples: tuple[str, ...]) -> Callable:
    """Decorator: ``build(match) -> Recipe`` for short names matching ``pattern`` (full match)."""

    def deco(build: Callable) -> Callable:
        SHORT_NAMES.append(ShortNameRule(re.compile(pattern), build, form, examples))
        return build

    return deco


def register_artifact_hook(stage: str) -> Callable:
    """Decorator: ``hook(model, extra)`` runs when an artifact is loaded, at ``stage``.

    Stages run in this order: ``resize`` hooks give the float skeleton its saved shapes
    (removed channels); then folded batch norms become identities; ``before_layers`` hooks
    wrap layers (binary blocks); the quantized layers are installed; ``after_layers`` hooks
    finish the model (per-token activation grids). ``extra`` is the header's ``extra``
    mapping; a hook ignores keys it does not own. This keeps :mod:`compactnn.export` free
    of method imports.
    """
    if stage not in ARTIFACT_HOOKS:
        raise CompactnnError(f"unknown artifact stage {stage!r}; stages: {ARTIFACT_STAGES}.")

    def deco(hook: Callable[[Any, dict[str, Any]], None]) -> Callable:
        if hook not in ARTIFACT_HOOKS[stage]:
            ARTIFACT_HOOKS[stage].append(hook)
        return hook

    return deco


def run_artifact_hooks(stage: str, model: Any, extra: dict[str, Any]) -> None:
    """Run every hook registered for ``stage`` on ``model`` (see :func:`register_artifact_hook`)."""
    for hook in ARTIFACT_HOOKS[stage]:
        hook(model, extra)


BUILTIN_CATALOG = "compactnn.methods"  # the module that imports every built-in method file


def load_builtins() -> None:
    """Import :data:`BUILTIN_CATALOG` once (its method files register themselves); nothing
    when it is imported or being imported already."""
    if BUILTIN_CATALOG not in sys.modules:
        importlib.import_module(BUILTIN_CATALOG)


def get_method(name: str) -> MethodEntry:
    """The method registered under ``name``; a CompactnnError lists the known names."""
    if name not in METHODS:
        load_builtins()
    if name not in METHODS:
        raise UnknownMethodError(
            name, f"unknown method {short_repr(name)}; known methods: {', '.join(sorted(METHODS))}."
        )
    return METHODS[name]


def method_for_config(config: Any) -> MethodEntry:
    """The method whose config type is exactly ``type(config)`` (one dict lookup).

    Example:
        >>> from compactnn.quant.gptq import GPTQConfig
        >>> method_for_config(GPTQConfig()).name
        'gptq'
    """
    entry = METHODS_BY_CONFIG.get(type(config))
    if entry is None:
        raise CompactnnError(
            f"no method is registered for config type {type(config).__name__}; pass the "
            "config of a registered method (see `compactnn recipes`), or register a handler "
            f"for it with @register('name', {type(config).__name__})."
        )
    return entry


def plugin_module(entry: MethodEntry) -> str | None:
    """The Python module outside compactnn that defines ``entry``'s handler (a plugin's), or
    ``None`` for compactnn's own methods."""
    where = getattr(entry.handler, "__module__", None) or ""
    return where if where and where.split(".")[0] != "compactnn" else None


def check_config_version(entry: MethodEntry, version: Any) -> None:
    """Refuse a saved config whose format ``version`` this compactnn (or, for a plugin's
    method, this version of the plugin) cannot read.

    Args:
        entry: the method the saved config belongs to.
        version: the version read from the recipe (an integer ``1..entry.version``).

    Raises:
        CompactnnError: ``version`` is not a positive integer or is newer than
            ``entry.version``; for a plugin's method the message names the plugin's module,
            the one to upgrade.
    """
    plugin = plugin_module(entry)
    reader = f"the plugin {plugin!r} defining it" if plugin else "this compactnn"
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CompactnnError(
            f"method {entry.name!r}: config version {version!r} must be a positive integer "
            f"({reader} writes version {entry.version})."
        )
    if version > entry.version:
        fix = (
            f"upgrade the plugin {plugin!r} (not compactnn) to load it"
            if plugin
            else "upgrade compactnn to load it"
        )
        raise CompactnnError(
            f"method {entry.name!r}: the recipe's config version {version} is newer than "
            f"{reader} reads (up to {entry.version}); {fix}."
        )


def check_field_names(entry: MethodEntry, version: int, config: Any, where: str) -> None:
    """Refuse an earlier field name (a key of the config class's ``renamed_fields``) in a
    config that says it is at the current ``version``: earlier names are migrated only for
    recipes of earlier versions (the config class then reads them under their new names).

    Raises:
        CompactnnError: naming the earlier name, its current name and the version.
    """
    renamed = getattr(entry.config_cls, "renamed_fields", None) or {}
    if version != entry.version or not isinstance(config, dict) or not renamed:
        return
    old = next((k for k in config if k in renamed), None)
    if old is not None:
        raise CompactnnError(
            f"{where}: {old!r} is the earlier name of {renamed[old]!r} (method "
            f"{entry.name!r}); this step says it is at the current config version "
            f"{entry.version}, which reads only {renamed[old]!r}: write {renamed[old]!r} "
            "(an earlier name is migrated only for a step of an earlier version)."
        )
