"""Base class of every method's config dataclass: validation hooks and dict round trips."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from compactnn.core.config_checks import check_config_ranges
from compactnn.core.fields import check_keys, field_hints, normalize, normalize_fields
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Frozen, validated, serialisable settings of one method.

    Subclasses are frozen dataclasses; they validate in ``__post_init__`` (call
    ``super().__post_init__()``) and get ``to_dict``/``from_dict`` for YAML recipes.
    Every field is checked against its type hint first (``bool``, ``int``, ``float``,
    ``str``, ``X | None``, ``tuple[...]``, ``Literal[...]``, ``QuantSpec``): a bool is not an
    int and a string is not a number, so ``bits: true`` or ``lr: '1e-3'`` fail with the
    field's name. Fields typed ``QuantSpec`` are (de)serialised as nested dicts; tuples as
    lists.
    """

    method_name: ClassVar[str] = ""
    # Format version of this config's fields: add 1 when a saved field's meaning changes.
    config_version: ClassVar[int] = 1
    # Field names of earlier versions -> current names; saved recipes keep loading.
    renamed_fields: ClassVar[dict[str, str]] = {}
    # Whether the method always reads calibration data (GPTQ, AWQ, Wanda...).
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self) -> None:
        normalize_fields(self)
        check_config_ranges(self)  # a learning rate of -1, 10^12 steps: refused by field name

    def needs_data(self) -> bool:
        """Whether a step with this config cannot run without calibration data."""
        return self.needs_calibration

    def uses_data(self) -> bool:
        """Whether a step with this config reads calibration data when it is given: every
        config that needs it, and those that run without it but fit better with it (FFN's
        refit)."""
        return self.needs_data()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str | None = None) -> MethodConfig:
        """The config from a YAML/JSON mapping; unknown keys and wrong types are refused.

        Example:
            >>> from compactnn.prune.nm import NMConfig
            >>> NMConfig.from_dict({"n": 1, "m": 4}).n
            1
        """
        where = where or cls.__name__
        hints = field_hints(cls)
        if isinstance(data, dict) and cls.renamed_fields:
            data = renamed_keys(data, cls.renamed_fields, where)
        data = check_keys(data, hints, where)
        values = {k: normalize(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        return cls(**values)


def renamed_keys(data: dict[str, Any], renamed: dict[str, str], where: str) -> dict[str, Any]:
    """``data`` with each earlier field name (a key of ``renamed``) under its current name;
    a CompactnnError when the old and the new name are both given (which one holds?).

    Example:
        >>> renamed_keys({"amount": 0.3}, {"amount": "sparsity"}, "cfg")
        {'sparsity': 0.3}
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        new = renamed.get(key, key)
        if new in out:
            old = key if new != key else next(k for k in data if renamed.get(k) == new)
            raise CompactnnError(
                f"{where}: {old!r} is the earlier name of {new!r} and both are given; keep "
                f"only {new!r}."
            )
        out[new] = value
    return out


def _plain(value: Any) -> Any:
    """A JSON/YAML-ready form: QuantSpecs as dicts, tuples (nested too) as lists."""
    if isinstance(value, QuantSpec):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
