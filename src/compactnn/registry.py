"""The one registry: method name -> (config type, handler), plus short-name grammars.

Each method file registers itself with ``@register("name", NameConfig)`` on its handler.
:mod:`compactnn.methods` imports every method file once; nothing is discovered implicitly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compactnn.errors import CompactnnError


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type
    handler: Callable[..., Any]
    summary: str


@dataclass(frozen=True)
class ShortNameRule:
    pattern: re.Pattern[str]
    build: Callable[[re.Match[str]], Any]
    form: str
    examples: tuple[str, ...]


METHODS: dict[str, MethodEntry] = {}
SHORT_NAMES: list[ShortNameRule] = []


def register(name: str, config_cls: type, summary: str = "") -> Callable:
    """Decorator: register ``handler(model, targets, config, ctx) -> model`` for ``name``."""

    def deco(handler: Callable) -> Callable:
        if name in METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        config_cls.method_name = name
        doc = (handler.__doc__ or "").strip().splitlines()
        METHODS[name] = MethodEntry(name, config_cls, handler, summary or (doc[0] if doc else ""))
        return handler

    return deco


def register_short_name(pattern: str, form: str, examples: tuple[str, ...]) -> Callable:
    """Decorator: ``build(match) -> Recipe`` for short names matching ``pattern`` (full match)."""

    def deco(build: Callable) -> Callable:
        SHORT_NAMES.append(ShortNameRule(re.compile(pattern), build, form, examples))
        return build

    return deco


def ensure_loaded() -> None:
    import compactnn.methods  # noqa: F401  (imports every method file once)


def get_method(name: str) -> MethodEntry:
    ensure_loaded()
    if name not in METHODS:
        raise CompactnnError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}."
        )
    return METHODS[name]


def method_for_config(config: Any) -> MethodEntry:
    ensure_loaded()
    for entry in METHODS.values():
        if type(config) is entry.config_cls:
            return entry
    raise CompactnnError(f"no method is registered for config type {type(config).__name__}")
