"""Candidate formats of a search: quantization short names, one step each in the recipe.

A format is any quantization short name ``w<W>[a<A>[g]][-g<G>][-<method>]`` (``w3-g32-gptq``,
``w4a8``), optionally after a structured-pruning prefix ``ch<P>+`` (``ch50+w8a8``: half of the
layer's output channels removed by L1 norm, :mod:`compactnn.prune.channel`, then ``w8a8``).
Pruned formats run on the same int8 kernel with fewer channels, so they are the formats that
make a latency budget bite on the deploy runtime; they fit only layers whose output channels
are not coupled to a residual add (the search finds which); coupled layers are pruned a whole
residual stream at a time (:mod:`~compactnn.mixed_precision.groups`). The search runs the
quantization with ``first_last_bits=None``: the first/last-layer rule is a constraint of the
allocation (``first_last_min_bits``), not a silent upgrade inside a step.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch
from torch import nn

from compactnn.core.qtype import QType
from compactnn.core.quantize import dequantize, grouped_view, quantize, scale_zero_from_range
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError, user_stacklevel
from compactnn.quant.base import QuantConfig
from compactnn.recipe import Step, parse_short_name


@dataclasses.dataclass(frozen=True)
class Format:
    """One candidate format: its short name and the recipe step it becomes.

    Example:
        >>> Format.parse("w3-g32-gptq").weight.group_size
        32
    """

    name: str
    method: str
    config: QuantConfig
    prune: float = 0.0  # fraction of output channels removed (structured, L1) before quantizing

    @property
    def weight(self) -> QuantSpec:
        return self.config.weight

    @property
    def act(self) -> QuantSpec | None:
        return self.config.act

    @classmethod
    def parse(cls, name: str) -> Format:
        """A format from a quantization short name; anything else raises ``CompactnnError``."""
        if not isinstance(name, str):
            raise CompactnnError(f"a search format is a short name such as 'w4a8', got {name!r}.")
        full = name.strip().lower()
        prune, quant = 0.0, full
        m = re.fullmatch(r"ch(\d+)\+(.+)", full)
        if m is not None:
            prune, quant = int(m[1]) / 100, m[2]
            if not 0 < prune < 1:
                raise CompactnnError(
                    f"search format {name!r}: the pruned percentage must be 1-99 (ch50+w8a8)."
                )
        recipe = parse_short_name(quant)
        step = recipe.steps[0]
        if len(recipe.steps) != 1 or not isinstance(step.config, QuantConfig):
            raise CompactnnError(
                f"search format {name!r} is not a quantization short name "
                "(w<W>[a<A>[g]][-g<G>][-<method>], e.g. w3-g32-gptq or w4a8)."
            )
        if not hasattr(step.config, "first_last_bits"):
            raise CompactnnError(f"search format {name!r}: its method has no first_last_bits.")
        config = dataclasses.replace(step.config, first_last_bits=None)
        return cls(full if prune else recipe.name, step.method, config, prune)

    def prune_step(self, names: list[str]) -> Step:
        """The channel-pruning step of a ``ch<P>+`` format for exactly the layers ``names``."""
        from compactnn.core.modules import Targets

        step = parse_short_name(f"ch{round(self.prune * 100)}").steps[0]
        return Step(step.method, step.config, Targets(names=tuple(names)))

    def kept_rows(self, rows: int) -> int:
        """Output channels a layer of ``rows`` keeps at this format."""
        return rows - int(rows * self.prune)

    def step(self, names: list[str]) -> Step:
        """The recipe step that applies this format to exactly the layers ``names``."""
        from compactnn.core.modules import Targets  # local: keeps the module header short

        return Step(self.method, self.config, Targets(names=tuple(names)))

    def fits(self, layer: nn.Module) -> bool:
        """Whether the weight grid applies to ``layer`` (group size divides its input size)."""
        if self.weight.granularity != "group":
            return True
        return layer.weight[0].numel() % self.weight.group_size == 0


def is_binary(config: QuantConfig) -> bool:
    """Whether ``config`` is a binary method's (xnor, bireal, reactnet, sibnn): not a candidate."""
    from compactnn.engines.binary_weight import BinaryConfig  # local: engines import torch extras

    return isinstance(config, BinaryConfig)


def warn_untrained(formats: list[Format]) -> None:
    """Warn once, naming them, when candidate formats are training-aware (a ``QATConfig``
    other than TernaryBERT, which distils inside compress): search scores them and compress
    runs them calibrated only, not trained."""
    from compactnn.engines.qat import QATConfig  # local: engines import torch extras
    from compactnn.quant.ternarybert import TernaryBERTConfig

    names = [
        f.name
        for f in formats
        if isinstance(f.config, QATConfig)
        and not isinstance(f.config, TernaryBERTConfig)
        and not getattr(type(f.config), "post_training", False)  # Network Sketching
    ]
    if names:
        warnings.warn(
            f"search formats {', '.join(names)} are training-aware: the search scores them, and "
            "compress runs the recipe, calibrated only, not trained; train the searched recipe "
            "(compactnn train) for the accuracy they are meant to reach.",
            stacklevel=user_stacklevel(),
        )


def parse_formats(names: list[str] | tuple[str, ...] | str) -> list[Format]:
    """Formats from short names (a list, or one comma-separated string), no duplicates.

    Example:
        >>> [f.name for f in parse_formats("w2a8,w4a8")]
        ['w2a8', 'w4a8']
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    formats = [Format.parse(n) for n in names]
    binary = [n.strip() for n, f in zip(names, formats, strict=True) if is_binary(f.config)]
    if binary:
        raise CompactnnError(
            f"search formats {binary} are binary: binary blocks are not candidates of a "
            "search (they need block surgery and training; docs/search.md). Drop them from "
            "the format list and use integer formats (e.g. w2a8,w4a8,w8a8); train a binary "
            "model on its own with `compactnn train` (recipe w1a1-xnor etc.)."
        )
    seen = [f.name for f in formats]
    if len(formats) < 2 or len(set(seen)) != len(seen):
        raise CompactnnError(
            f"formats={seen} must name at least two different formats (e.g. "
            "w2a8,w3a8,w4a8,w8a8); a search among one format is that uniform recipe."
        )
    return formats


def fallback_format(fmts: list[Format], j: int, widest: int) -> int:
    """Where format ``j`` does not fit a layer in its uniform recipe: the same quantization
    without pruning if it is a candidate, else the widest format (index ``widest``)."""
    plain = fmts[j].name.split("+")[-1]
    return next((k for k, f in enumerate(fmts) if f.name == plain), widest)


def rtn_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` rounded to the nearest point of ``spec``'s min-max grid, dequantized.

    Example:
        >>> w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
        >>> rtn_weight(w, QuantSpec(bits=2, symmetric=False, granularity="channel")).tolist()
        [[0.0, 1.0, 2.0, 3.0]]
    """
    w = grouped_view(weight.detach().float(), spec.granularity, spec.group_size)  # (R, G, S)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    qtype = QType(spec.bits, signed=spec.symmetric)
    scale, zero = scale_zero_from_range(lo, hi, qtype, spec.symmetric)
    return dequantize(quantize(w, scale, zero, qtype), scale, zero).reshape(weight.shape)


def pruned_rows(weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Indices of the output channels a ``ch<P>+`` format removes: the smallest L1 norms of
    ``weight``'s rows (the unfolded layer's, as channel pruning ranks them); empty otherwise.

    Example:
        >>> pruned_rows(torch.tensor([[3.0], [1.0], [2.0], [4.0]]), Format.parse("ch50+w8a8"))
        tensor([1, 2])
    """
    rows = weight.shape[0]
    k = rows - fmt.kept_rows(rows)
    norms = weight.detach().reshape(rows, -1).abs().sum(1)
    return torch.sort(torch.argsort(norms, stable=True)[:k]).values


def why_not(fmt: Format, layer: nn.Module, first_last_min_bits: int | None, is_end: bool) -> str:
    """Why ``fmt`` is not allowed for ``layer``: its group size, the first-last rule, or (else)
    its channel pruning (the layer feeds a residual add or cannot shrink)."""
    row = layer.weight[0].numel()
    if not fmt.fits(layer):
        size = fmt.weight.group_size
        return f"{fmt.name}: group size {size} does not divide its {row} weights per row"
    if is_end and first_last_min_bits is not None and fmt.weight.bits < first_last_min_bits:
        return f"{fmt.name}: {fmt.weight.bits} bits < first_last_min_bits={first_last_min_bits}"
    return f"{fmt.name}: its channels cannot be pruned"


def check_allowed(
    layers: dict[str, nn.Module],
    formats: list[Format],
    allowed,
    first_last_min_bits: int | None = None,
    ends: set[str] | None = None,
) -> None:
    """Refuse, naming them and why, layers that no candidate format is allowed for.

    Example:
        >>> fmts = parse_formats("w4-g32,w4-g64")
        >>> check_allowed({"fc": nn.Linear(9, 2)}, fmts, [[False] * 2])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        compactnn.errors.CompactnnError: no format in ['w4-g32', 'w4-g64'] is allowed for ...
    """
    names = list(layers)
    ends = ends if ends is not None else {names[0], names[-1]} if names else set()
    empty = [n for n, row in zip(names, allowed, strict=True) if not any(row)]
    if not empty:
        return
    shown = empty[:3]
    whys = [
        f"{n} ("
        + "; ".join(why_not(f, layers[n], first_last_min_bits, n in ends) for f in formats)
        + ")"
        for n in shown
    ]
    more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
    text = " ".join(whys)
    fixes = [
        "add a format that fits (per channel, e.g. w4a8, or a group size dividing the row)"
        if "group size" in text
        else "",
        "lower first_last_min_bits or add a wider format" if "first_last" in text else "",
        "add a format without channel pruning" if "pruned" in text else "",
    ]
    raise CompactnnError(
        f"no format in {[f.name for f in formats]} is allowed for layer"
        f"{'s' if len(empty) > 1 else ''} {', '.join(whys)}{more}: "
        + "; ".join(f for f in fixes if f)
        + "."
    )
