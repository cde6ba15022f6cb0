"""How one tensor is quantized: bits, sign, symmetry, granularity and range estimation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from compactnn.core.fields import check_keys, field_hints, normalize, normalize_fields
from compactnn.core.qtype import QType
from compactnn.errors import CompactnnError

GRANULARITIES = ("tensor", "channel", "group")
RANGE_METHODS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """Quantization of one tensor kind (a layer's weight, or the activation entering it).

    Args:
        bits: integer width, 1..8.
        symmetric: zero point fixed at 0 (signed grid) instead of a learned offset.
        granularity: ``"tensor"``, ``"channel"`` (output channel, dim 0) or ``"group"``
            (``group_size`` consecutive input elements of each output channel). Left out
            (None), the role's default: ``"channel"`` for a weight, and ``"tensor"`` once a
            config takes the spec as its activation spec (:meth:`for_activation`).
        group_size: elements per group, only with ``granularity="group"``.
        range_method: ``"minmax"``, ``"percentile"`` or ``"mse"`` (grid search of the clip).
        percentile: upper percentile kept with ``range_method="percentile"``.
        signed: for asymmetric activations, whether the grid is signed (default unsigned).
        dynamic: activations only: the range is taken from each tensor at run time
            (``[min(x, 0), max(x, 0)]`` of the whole tensor, ONNX's ``DynamicQuantizeLinear``
            grid), nothing calibrated; per tensor and asymmetric.

    Example:
        >>> QuantSpec(bits=4, granularity="group", group_size=32).qtype.name
        'int4'
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str | None = None
    group_size: int | None = None
    range_method: str = "minmax"
    percentile: float = 99.99
    signed: bool | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        normalize_fields(self)  # types first: bits=True or symmetric='false' are refused
        # Not a field: equality, to_dict and repr see the resolved granularity only.
        object.__setattr__(self, "_granularity_given", self.granularity is not None)
        if self.granularity is None:
            object.__setattr__(self, "granularity", "channel")
        QType(self.bits)  # validates bits
        if self.granularity not in GRANULARITIES:
            raise CompactnnError(
                f"granularity={self.granularity!r} is unknown; use one of {GRANULARITIES}."
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise CompactnnError(
                    f"granularity='group' needs a positive integer group_size, "
                    f"got {self.group_size!r}."
                )
        elif self.group_size is not None:
            raise CompactnnError(
                f"group_size={self.group_size} only applies with granularity='group'."
            )
        if self.range_method not in RANGE_METHODS:
            raise CompactnnError(
                f"range_method={self.range_method!r} is unknown; use one of {RANGE_METHODS}."
            )
        if not 50.0 < float(self.percentile) <= 100.0:
            raise CompactnnError(f"percentile={self.percentile} must lie in (50, 100].")
        if self.dynamic and (self.symmetric or self.granularity == "group" or self.signed):
            raise CompactnnError(
                "dynamic=True is ONNX's DynamicQuantizeLinear grid: unsigned, asymmetric, one "
                "range per tensor; give symmetric=False and no group granularity (a<A>g "
                "short names are the per-group dynamic grid)."
            )
        if self.dynamic and self.granularity == "channel" and self._granularity_given:
            raise CompactnnError(
                "dynamic=True takes one range per tensor: leave granularity out or give 'tensor'."
            )
        if self.symmetric and self.bits == 1:
            raise CompactnnError(
                "a symmetric 1-bit grid has no zero-centred levels; use symmetric=False "
                "or a binary method (w1a1-xnor)."
            )

    @property
    def qtype(self) -> QType:
        signed = self.symmetric if self.signed is None else self.signed
        return QType(self.bits, signed=signed)

    def for_activation(self) -> QuantSpec:
        """This spec as an activation spec: per tensor unless a granularity was given.

        Example:
            >>> QuantSpec(bits=4).for_activation().granularity
            'tensor'
        """
        # getattr: a spec unpickled from before this flag existed had its granularity given
        given = getattr(self, "_granularity_given", True)
        return self if given else replace(self, granularity="tensor")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a mapping; ``dynamic`` only when True (files written without it
        stay readable by versions that predate it)."""
        out = asdict(self)
        if not out["dynamic"]:
            del out["dynamic"]
        return out

    @classmethod
    def from_dict(
        cls, data: dict[str, Any] | QuantSpec | None, where: str = "QuantSpec"
    ) -> QuantSpec | None:
        """The spec from a mapping (YAML, artifact header); unknown keys and wrong types fail.

        Example:
            >>> QuantSpec.from_dict({"bits": 4, "symmetric": False}).qtype.name
            'uint4'
        """
        if data is None or isinstance(data, QuantSpec):
            return data
        hints = field_hints(cls)
        data = check_keys(data, hints, where)
        return cls(**{k: normalize(v, hints[k], f"{where}.{k}") for k, v in data.items()})
