"""SHA-256 digests of tensors: what a cache key or a checkpoint's fingerprint is made of."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch


def _update(h: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s shape, dtype and raw bytes to ``h`` (no copy of a contiguous CPU tensor)."""
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over the shapes, dtypes and bytes of ``tensors``, in order.

    Example:
        >>> tensor_digest([torch.ones(2)]) == tensor_digest([torch.ones(2, 1)])
        False
    """
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def tensors_sha256(items: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 over named values: each name, then a tensor's shape, dtype and bytes (other
    values by their ``repr``).

    Example:
        >>> a = tensors_sha256([("w", torch.ones(2))])
        >>> a == tensors_sha256([("w", torch.ones(2))]), a == tensors_sha256([("v", torch.ones(2))])
        (True, False)
    """
    h = hashlib.sha256()
    for name, value in items:
        h.update(f"{name}\0".encode())
        if isinstance(value, torch.Tensor):
            _update(h, value)
            h.update(b"\0")
        else:
            h.update(f"{value!r}\0".encode())
    return h.hexdigest()
