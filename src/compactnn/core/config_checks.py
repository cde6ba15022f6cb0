"""Range checks shared by every method config, by field name: one table, not forty checks.

A config field's *name* says what kind of number it is: ``lr`` and ``*_lr`` are learning
rates (finite, > 0), ``*steps``, ``iters``, ``epochs`` are counts of work (whole numbers
from 0 to :data:`MAX_COUNT`), ``temperature`` divides logits (> 0), ``distill`` and the
other loss weights are >= 0. :func:`check_ranges` checks the fields of a config class
against :data:`RULES` (the first rule whose pattern matches the field name wins; a ruled
float must also be finite: no ``.nan`` or ``.inf``). A config's own ``__post_init__`` keeps its
specific checks (``ratio`` in [0, 1), ``bits`` in 1..8); this table only refuses values no
method can use, with a one-line message naming the key path, e.g.
``steps[0].config.lr=-1 must be > 0 (a learning rate, e.g. 0.001)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from compactnn.core.fields import field_hints, short_repr
from compactnn.errors import CompactnnError

MAX_COUNT = 10_000_000  # steps, iterations, epochs: 1e7 steps already take days on a CPU


@dataclasses.dataclass(frozen=True)
class Rule:
    """A range a numeric field must lie in: ``low``/``high`` (None: unbounded), with
    ``low_open`` when ``low`` itself is refused; ``what`` says what the field is."""

    what: str
    low: float | None = None
    low_open: bool = False
    high: float | None = None

    def problem(self, value: float) -> str | None:
        """Why ``value`` breaks this rule, or None when it keeps it.

        Example:
            >>> Rule("a learning rate, e.g. 0.001", 0.0, low_open=True).problem(-1)
            'must be > 0 (a learning rate, e.g. 0.001)'
        """
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            sign = ">" if self.low_open else ">="
            return f"must be {sign} {_number(self.low)} ({self.what})"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high:,} ({self.what})"
        return None


_LR = Rule("a learning rate, e.g. 0.001", 0.0, low_open=True)
_COUNT = Rule("a count of steps, iterations or epochs; 0 for none", 0, high=MAX_COUNT)
_WEIGHT = Rule("the weight of a loss term; 0 turns it off", 0.0)

# (field-name pattern, rule): the first full match wins.
RULES: tuple[tuple[re.Pattern[str], Rule], ...] = tuple(
    (re.compile(pattern), rule)
    for pattern, rule in (
        (r"lr_quant", Rule("the learning rate of the quantizer parameters; 0 freezes them", 0.0)),
        (r"lr|\w+_lr", _LR),
        (r"\w+_wd", Rule("a weight decay; 0 for none", 0.0)),
        (r"(\w+_)?steps?|(\w+_)?iters|iterations|(\w+_)?epochs|sweeps", _COUNT),
        (r"recalibrate_batches", _COUNT),
        (r"batch_size", Rule("samples per batch, e.g. 32", 1)),
        (r"block_size|grid|frequency|max_block_layers", Rule("a whole number, at least 1", 1)),
        (r"num_samples", Rule("calibration samples recommended, e.g. 512", 0)),
        (r"temperature", Rule("the distillation temperature, e.g. 4", 0.0, low_open=True)),
        (r"distill|round_weight|hidden|attention|cosine|logits|approx|wpc", _WEIGHT),
        (r"beta_start|beta_end", Rule("an exponent of the rounding regulariser, e.g. 20", 0.0)),
    )
)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def rule_for(name: str) -> Rule | None:
    """The range rule of a config field called ``name``, None when it has none.

    Example:
        >>> rule_for("finetune_steps").high
        10000000
        >>> rule_for("ratio") is None
        True
    """
    return next((rule for pattern, rule in RULES if pattern.fullmatch(name)), None)


def range_problem(name: str, value: Any, hint: Any) -> str | None:
    """Why ``value`` of field ``name`` (typed ``hint``) is out of range, or None. Values
    that are not numbers are left to the type check (:func:`compactnn.core.fields.normalize`).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if hint not in (int, float, int | None, float | None):
        return None
    rule = rule_for(name)
    if rule is None:  # the config's own checks, if any
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number ({rule.what})"
    return rule.problem(value)


def check_ranges(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Refuse a field of config class ``cls`` whose value in ``values`` breaks its rule.

    Args:
        cls: the config dataclass (its type hints say which fields are numbers).
        values: field name -> value, e.g. a recipe step's raw ``config`` mapping.
        where: the key path of ``values`` in messages, e.g. ``"steps[0].config"``.

    Raises:
        CompactnnError: one line naming ``where.field``, the value and the range.

    Example:
        >>> from compactnn.prune.channel import ChannelConfig
        >>> check_ranges(ChannelConfig, {"lr": -1}, "steps[0].config")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        compactnn.errors.CompactnnError: steps[0].config.lr=-1 must be > 0 (a learning rate, ...).
    """
    hints = field_hints(cls)
    for name, value in values.items():
        if name not in hints:
            continue
        problem = range_problem(name, value, hints[name])
        if problem is not None:
            raise CompactnnError(f"{where}.{name}={short_repr(value)} {problem}.")


def check_config_ranges(config: Any, where: str | None = None) -> None:
    """:func:`check_ranges` on the fields of a config object (``where`` defaults to its
    class name: ``ChannelConfig.lr=-1.0 must be > 0 ...``)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    check_ranges(type(config), values, where or type(config).__name__)


# A config's own message starts ``name=value``, maybe after ``XxxConfig.`` or ``method: ``.
_LEADING_FIELD = re.compile(r"(?:\w+(?:\.|: ))?(\w+)=(\S*?)[,.:;)]?(?:\s|$)")


def located(message: str, data: Any, where: str) -> str:
    """``message`` (a config's own check, which knows its field but not where the recipe put
    it) with the key path of that field in ``data``, the raw mapping read at ``where``.

    The field is the ``name=value`` the message starts with; where ``data`` holds that name
    more than once (``weight.bits`` and ``act.bits``), the one whose value the message quotes.
    A message naming no field found in ``data`` is prefixed with ``where``.

    Example:
        >>> located("bits=-4 is out of range: 1..8 bits.", {"weight": {"bits": -4}}, "s.config")
        's.config.weight.bits=-4 is out of range: 1..8 bits.'
    """
    if message.startswith(where):
        return message
    m = _LEADING_FIELD.match(message)
    paths = list(_paths_of(data, m[1])) if m else []
    if not paths:
        return f"{where}: {message}"
    quoted = [p for p, value in paths if _same_value(value, m[2])]
    path = (quoted or [p for p, _ in paths])[0]
    return f"{where}.{path}={message[m.end(1) + 1 :]}"


def _paths_of(data: Any, key: str, prefix: str = "", depth: int = 0) -> Any:
    """(path, value) of every ``key`` in nested mappings and lists ``data``, in order."""
    if depth > 8:
        return
    items = data.items() if isinstance(data, Mapping) else ()
    if isinstance(data, list):
        items = ((f"[{i}]", v) for i, v in enumerate(data))
    for k, value in items:
        path = f"{prefix}{k}" if str(k).startswith("[") or not prefix else f"{prefix}.{k}"
        if k == key:
            yield path, value
        yield from _paths_of(value, key, path, depth + 1)


def _same_value(value: Any, text: str) -> bool:
    """Whether ``text`` (a value quoted in a message) is ``value``: ``-1.0`` is ``-1``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return repr(value) == text or str(value) == text
