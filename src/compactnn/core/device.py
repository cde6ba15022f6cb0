"""Device names a user passes (``"cpu"``, ``"cuda"``, ``"cuda:1"``), checked before any work."""

from __future__ import annotations

import torch

from compactnn.errors import CompactnnError


def check_device(name: str | torch.device) -> torch.device:
    """``torch.device(name)``, or a CompactnnError naming what this machine lacks.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise CompactnnError(
            f"device={name!r} is not a device name: use 'cpu', 'cuda' or 'cuda:N'."
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CompactnnError(f"device={name!r} but PyTorch sees no CUDA GPU here: use 'cpu'.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CompactnnError(
                f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible."
            )
    return device
