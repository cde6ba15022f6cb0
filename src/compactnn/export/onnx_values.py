"""Refuse an ONNX export whose traced graph depends on the values of its input.

The TorchScript exporter runs the model once and records the operations it ran: a Python
``if`` on a tensor's value (``if h.mean() > 0.5:``) or a number read from one
(``x.max().item()``) is fixed to what the example gave, and the file then computes the
other inputs' outputs on the example's path, silently (a CNN with such a branch deployed on
ONNX Runtime was 124-160 output steps off, argmax agreement 0%, on inputs taking the other
branch). The tracer warns at each such conversion, but also at harmless shape checks
(``assert x.shape[1] == 3``, ``if x.size(0) > 1``: sizes are tensors while tracing), so a
warning alone proves nothing. When one comes from code outside torch, the model is traced
again on differently valued inputs of the same shapes (:data:`SCALES`: the example times
16, divided by 16 and times -16, so that a threshold above or below the example's values
and a sign test flip, whatever the input's range: a non-negative input, e.g. an image in
[0, 1], that a quantizer calibrated on [0, max] clamps to 0 once negated, still moves up
and down); a graph that differs (operators, their attributes or the constants) is refused,
naming the line whose tensor-to-Python conversion changed between the two runs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from compactnn._optional import require
from compactnn.errors import CompactnnError

onnx = require("onnx", "onnx")

TRACE_NOTE = r"(?s).*might cause the trace to be incorrect"  # the tracer's warnings
CONVERSIONS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist"}
_TORCH = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)


def _outside_torch(filename: str) -> bool:
    return not os.path.abspath(filename).startswith(_TORCH)


@contextlib.contextmanager
def tracer_notes() -> Iterator[list[warnings.WarningMessage]]:
    """Collect the tracer's warnings that the trace may be wrong, whatever the caller's
    warning filters say (:func:`show_notes` shows them as they would have been); every
    other warning is shown as it would have been."""
    notes: list[warnings.WarningMessage] = []
    log: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as log:
            warnings.filterwarnings("always", TRACE_NOTE, torch.jit.TracerWarning)
            yield notes
    finally:  # outside the recording: shown where the caller's warnings go
        for w in log:
            if issubclass(w.category, torch.jit.TracerWarning) and _is_note(w.message):
                notes.append(w)
            else:  # it passed the caller's filters already
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def show_notes(notes: list[warnings.WarningMessage]) -> None:
    """Warn ``notes`` (from :func:`tracer_notes`) again, once per place, through the
    caller's filters (by the module that raised them, as the tracer's own warning was)."""
    modules = {
        os.path.abspath(f): m
        for m in list(sys.modules.values())
        if isinstance(f := getattr(m, "__file__", None), str)
    }
    for (file, line), w in {(w.filename, w.lineno): w for w in notes}.items():
        m = modules.get(os.path.abspath(file))
        name = None if m is None else m.__name__
        # the module's registry: a warning shown once per place stays shown once
        registry = None if m is None else m.__dict__.setdefault("__warningregistry__", {})
        warnings.warn_explicit(w.message, w.category, file, line, name, registry)


def _is_note(message: Warning | str) -> bool:
    return "might cause the trace to be incorrect" in str(message)


# Positive rescales move a threshold on magnitudes both ways for any input range (a negated
# non-negative input is clamped to 0 by a quantizer calibrated on [0, max], and a model
# asserting x >= 0 refuses it); the sign flip moves a sign test.
SCALES = (16.0, 1 / 16, -16.0)


def value_variants(args: tuple) -> Iterator[tuple]:
    """The example with other values of the same shapes and dtypes: floating tensors times
    each of :data:`SCALES` (integer ones, e.g. token ids, keep their values, reversed along
    the last axis for the negative scale). A variant equal to the example is left out."""
    for scale in SCALES:
        variant = tuple(_other(a, scale) for a in args)
        if any(v is not a for v, a in zip(variant, args, strict=True)):
            yield variant


def _other(a: Any, scale: float) -> Any:
    if not isinstance(a, torch.Tensor):
        return a
    if a.is_floating_point() or a.is_complex():
        return a * scale
    return a.flip(-1) if scale < 0 and a.dim() > 0 else a  # ids stay valid ids


def graph_form(data: bytes) -> tuple:
    """What of an ONNX model can depend on traced values: each node's operator and
    attributes in order, and the initializers."""
    graph = onnx.load_from_string(data).graph
    nodes = tuple((n.op_type, *(a.SerializeToString() for a in n.attribute)) for n in graph.node)
    return nodes, tuple(i.SerializeToString() for i in graph.initializer)


def check_value_branches(
    export: Callable[[tuple], bytes],
    args: tuple,
    data: bytes,
    notes: list[warnings.WarningMessage],
    source: nn.Module,
    keywords: list[str] | None = None,
) -> None:
    """Raise ``CompactnnError`` when ``export`` (which gave ``data`` for ``args`` with the
    tracer's ``notes``) gives another graph for other values. The place named is found by
    running a copy of ``source`` (the user's model, whose code the lines are in; called
    with ``args`` by the names ``keywords``, if given) on both.

    Nothing is traced again without a note from code outside torch; a variant the model
    does not run on (a value check that raises, e.g. ``assert (x >= 0).all()`` on the
    negated example) is skipped, the others are still compared.
    """
    places = [(w.filename, w.lineno) for w in notes if _outside_torch(w.filename)]
    if not places:  # torch's own (shape) checks only
        return
    form = graph_form(data)
    for variant in value_variants(args):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                other = export(variant)
        except Exception:  # the model refuses these values: nothing to compare
            continue
        if graph_form(other) != form:
            model = copy.deepcopy(source).eval()

            def run(*a: Any, model: nn.Module = model) -> Any:
                return model(**dict(zip(keywords, a, strict=True))) if keywords else model(*a)

            file, line = changed_conversion(run, args, variant) or places[0]
            raise CompactnnError(
                f"ONNX export: the model's graph depends on the values of its input at "
                f"{_shown(file)}:{line} (a Python if or number computed from a tensor is "
                "fixed to the example's value in the file, and other inputs would run the "
                "example's path): compute it with tensor ops (e.g. torch.where) or move it "
                "out of the model."
            )


class _Conversions(TorchFunctionMode):
    """Records each tensor-to-Python conversion: (file, line) of its caller and its value."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[str, int], Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in CONVERSIONS:
            self.seen.append((_caller(), out))
        return out


def _caller() -> tuple[str, int]:
    frame = sys._getframe(2)
    while frame.f_back is not None and (
        not _outside_torch(frame.f_code.co_filename)
        or os.path.abspath(frame.f_code.co_filename) == _HERE
    ):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno


Seen = list[tuple[tuple[str, int], Any]]


def _conversions(model: Callable[..., Any], args: tuple) -> Seen | None:
    try:
        with torch.no_grad(), _Conversions() as mode:
            model(*args)
    except Exception:
        return None
    return mode.seen


def changed_conversion(
    model: Callable[..., Any], args: tuple, variant: tuple
) -> tuple[str, int] | None:
    """The first place where running ``model`` on ``variant`` converted a tensor to another
    Python value than on ``args`` (or took another path right after it); None if none."""
    a, b = _conversions(model, args), _conversions(model, variant)
    if a is None or b is None:
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x[0] != y[0]:  # another path: decided by the conversion before
            return a[i - 1][0] if i else x[0]
        if x[1] != y[1]:
            return x[0]
    return None


def _shown(file: str) -> str:
    """``file`` relative to the working folder when it lies under it."""
    rel = os.path.relpath(file) if os.path.isabs(file) else file
    return file if rel.startswith("..") else rel
