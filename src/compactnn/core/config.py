"""Base class of every method's config dataclass: validation hooks and dict round trips."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Frozen, validated, serialisable settings of one method.

    Subclasses are frozen dataclasses; they validate in ``__post_init__`` (call
    ``super().__post_init__()``) and get ``to_dict``/``from_dict`` for YAML recipes.
    Fields typed ``QuantSpec`` are (de)serialised as nested dicts; tuples as lists.
    """

    method_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, QuantSpec):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MethodConfig:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise CompactnnError(
                f"{cls.__name__}: unknown field(s) {sorted(unknown)}; "
                f"known fields: {sorted(names)}."
            )
        for key, value in list(data.items()):
            hint = str(hints.get(key, ""))
            if "QuantSpec" in hint and isinstance(value, dict):
                data[key] = QuantSpec.from_dict(value)
            elif "tuple" in hint and isinstance(value, list):
                data[key] = tuple(value)
        try:
            return cls(**data)
        except TypeError as exc:
            raise CompactnnError(f"{cls.__name__}: {exc}") from exc
