"""A safetensors file written one tensor at a time, byte-identical to ``safetensors.save``.

``safetensors`` serialises a dict it holds entirely in memory. A streamed artifact has its
tensors in many staged files, so this writer lays the same file out itself: the tensor order
and the exact header bytes are taken from ``safetensors`` by serialising a stand-in dict of
one-element tensors with the same names and dtypes (cheap), and the stand-in's header is
rebuilt with this module's own formatter and compared byte for byte first, so a
``safetensors`` release with another layout fails loudly instead of writing a different
file.

Layout (safetensors format): 8-byte little-endian header length ``N``; ``N`` bytes of JSON
``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}``
padded with spaces to a multiple of 8; then each tensor's bytes in order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save as save_bytes

from compactnn.errors import CompactnnError

Fetch = Callable[[], torch.Tensor]
METADATA = {"format": "pt"}


def _parse(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 : 8 + n]


def _format(header: dict[str, Any]) -> bytes:
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[list[str], bytes]:
    """Data order of the tensors and the header bytes safetensors writes for them.

    Args:
        specs: name -> (dtype, shape) of every tensor of the file.

    Returns:
        ``(names in data order, padded header bytes)``.

    Raises:
        CompactnnError: the installed safetensors lays files out differently than expected.
    """
    stand_in = {n: torch.zeros(1, dtype=d) for n, (d, _) in specs.items()}
    reference, reference_bytes = _parse(save_bytes(stand_in, metadata=METADATA))
    if _format(reference) != reference_bytes:
        raise CompactnnError(
            "this safetensors release writes headers in an unexpected layout; streamed "
            "compression cannot reproduce its files: use compress without max_memory."
        )
    names = [k for k in reference if k != "__metadata__"]
    order = sorted(names, key=lambda k: reference[k]["data_offsets"][0])
    offsets: dict[str, list[int]] = {}
    at = 0
    for name in order:
        dtype, shape = specs[name]
        size = dtype.itemsize
        for s in shape:
            size *= s
        offsets[name] = [at, at + size]
        at += size
    header: dict[str, Any] = {}
    for key, value in reference.items():
        if key == "__metadata__":
            header[key] = value
        else:
            shape = list(specs[key][1])
            header[key] = {**value, "shape": shape, "data_offsets": offsets[key]}
    return order, _format(header)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of ``t`` in C order."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_streamed(
    filename: str | os.PathLike,
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    fetch: Callable[[str], torch.Tensor],
) -> None:
    """Write a safetensors file holding ``specs``'s tensors, fetching one at a time.

    Args:
        filename: the file to write (created or truncated).
        specs: name -> (dtype, shape).
        fetch: returns the tensor of a name; it must match its spec.

    Example:
        >>> write_streamed("x.safetensors", {"a": (torch.float32, (2,))}, lambda n: torch.ones(2))
    """
    order, header = layout(specs)
    with open(filename, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name in order:
            t = fetch(name)
            dtype, shape = specs[name]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CompactnnError(
                    f"staged tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                    f"{tuple(shape)}: the staging folder is damaged; delete it and rerun."
                )
            if t.numel():
                f.write(tensor_bytes(t))
