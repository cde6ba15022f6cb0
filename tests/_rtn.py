"""An independent reference of compactnn's stored int8 weights, shared by the API tests."""

from __future__ import annotations

import torch


def rtn_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 round-to-nearest, the float16-rounded scale as stored."""
    scale = (w.abs().amax(1, keepdim=True) / 127).half().float()
    return (w / scale).round().clamp(-128, 127) * scale
