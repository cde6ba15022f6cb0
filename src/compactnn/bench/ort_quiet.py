"""ONNX Runtime's quantizer advice, hidden around the peers' ``quantize_static`` and
``quantize_dynamic`` calls (:func:`quiet_ort_quantize`).

``onnxruntime.quantization`` logs on the root logger, so every bench run printed
``WARNING:root:Axis 1 is out-of-range for weight '...LayerNorm.weight' with rank 1`` once per
LayerNorm (per-channel QDQ skips rank-1 weights, as it should) and "Please consider (to run)
pre-processing before quantization" on each call, although the peers pre-process the model
first. Both are advice to the person quantizing, not findings about the measurement.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

ORT_ADVICE = ("Please consider to run pre-processing", "Please consider pre-processing")
# qdq_quantizer: f"Axis {axis} is out-of-range for weight '{name}' with rank {rank}"
AXIS_NOTICE = ("Axis ", " is out-of-range for weight ")


class _OrtQuantizeAdvice(logging.Filter):
    """Drops the two notices above; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        axis = msg.startswith(AXIS_NOTICE[0]) and AXIS_NOTICE[1] in msg
        return not (axis or msg.startswith(ORT_ADVICE))


@contextlib.contextmanager
def quiet_ort_quantize() -> Iterator[None]:
    """Within the block, the root logger drops ONNX Runtime's quantizer advice (see the
    module docstring); the filter is removed afterwards, whatever happens."""
    root = logging.getLogger()
    notice = _OrtQuantizeAdvice()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)
