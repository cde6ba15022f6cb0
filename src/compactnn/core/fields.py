"""Strict field types for config dataclasses, checked against their type hints.

Recipes come from YAML, where ``true``, ``'8'`` and ``[]`` all parse; a config must not take
``bits: true`` for an int or ``symmetric: 'false'`` for a bool. :func:`normalize` checks one
value against one type hint and returns it in canonical form (ints given for floats become
floats, lists given for tuples become tuples, dicts given for a nested dataclass with
``from_dict`` become that dataclass), or raises a one-line ``CompactnnError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import numbers
import reprlib
import types
import typing
from functools import cache
from typing import Any, Literal

from compactnn.errors import CompactnnError

MAX_REPR = 200  # characters of a value a message shows
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8

_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


@cache
def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of the dataclass fields of ``cls`` (cached per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def describe(hint: Any) -> str:
    """A human name for a type hint: ``"an integer or null"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _NAMES:
        return _NAMES[hint]
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis and len(typing.get_args(args[0])) == 2:
            return "a mapping {name: value} or a list of [name, value] pairs"
        return "a list"
    return getattr(hint, "__name__", str(hint))


def short_repr(value: Any, limit: int = MAX_REPR) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, in time and memory bounded by the
    cut (a deeply nested or huge value is never formatted whole).

    Example:
        >>> short_repr(list(range(100)))
        '[0, 1, 2, 3, 4, 5, 6, 7, ...]'
        >>> len(short_repr("x" * 10_000))
        80
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(where: str, value: Any, hint: Any) -> CompactnnError:
    return CompactnnError(
        f"{where}={short_repr(value)} ({type(value).__name__}) has the wrong type: "
        f"expected {describe(hint)}."
    )


def normalize(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` and put in canonical form.

    Args:
        value: the field value (from YAML, JSON or Python).
        hint: the field's resolved type hint.
        where: the field's name for messages, e.g. ``"RTNConfig.weight.bits"``.

    Raises:
        CompactnnError: ``value`` does not have the hinted type; the message names ``where``.

    Example:
        >>> normalize(1, float, "lr")
        1.0
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, value, hint)
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _fail(where, value, hint)
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise _fail(where, value, hint)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _fail(where, value, hint)
    if origin in (typing.Union, types.UnionType):
        return _normalize_union(value, hint, args, where)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _fail(where, value, hint)
    if origin is tuple:
        return _normalize_tuple(value, hint, args, where)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict) and hasattr(hint, "from_dict"):
            return hint.from_dict(value, where=where)
        raise _fail(where, value, hint)
    return value  # an annotation this checker does not know: left to __post_init__


def _normalize_union(value: Any, hint: Any, args: tuple, where: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _fail(where, value, hint)
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return normalize(value, arg, where)
        except CompactnnError as exc:
            errors.append(exc)
    if len(errors) == 1:  # Optional[X]: X's own message is the precise one
        raise errors[0]
    raise _fail(where, value, hint)


def _normalize_tuple(value: Any, hint: Any, args: tuple, where: str) -> tuple:
    item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
    if isinstance(value, dict) and len(typing.get_args(item)) == 2:
        value = list(value.items())  # tuple[tuple[K, V], ...]: a mapping is its pairs
    if not isinstance(value, (list, tuple)):
        raise _fail(where, value, hint)
    if item is not None:
        return tuple(normalize(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if not args:
        return tuple(value)
    if len(value) != len(args):
        raise CompactnnError(f"{where}={short_repr(value)} must have exactly {len(args)} items.")
    return tuple(
        normalize(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
    )


def normalize_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of frozen dataclass ``obj`` against its hint; store canonical forms."""
    where = prefix or type(obj).__name__
    for name, hint in field_hints(type(obj)).items():
        value = getattr(obj, name)
        fixed = normalize(value, hint, f"{where}.{name}")
        if fixed is not value:
            object.__setattr__(obj, name, fixed)


def check_keys(data: Any, known: typing.Iterable[str], where: str) -> dict[str, Any]:
    """``data`` as a dict after checking it is a mapping with only ``known`` keys."""
    known = list(known)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CompactnnError(
            f"{where} must be a mapping with keys {known}, got {type(data).__name__} "
            f"{short_repr(data)}."
        )
    unknown = [k for k in data if k not in known]
    if unknown:
        raise CompactnnError(f"{where}: unknown key(s) {short_repr(unknown)}; known keys: {known}.")
    return dict(data)
