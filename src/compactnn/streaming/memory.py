"""Memory budgets: parsing ``max_memory``, estimating one block's needs, measuring the peak.

The budget covers what the run adds on top of the process it starts in (the interpreter,
torch and transformers already imported): the weights kept outside the blocks, one block,
its calibration activations and the solver's work space. ``peak_rss`` reads the resident
set size's high-water mark (``VmHWM``), which :func:`reset_peak` restarts at the current
size, so a run reports its own peak even inside a long-lived process.
"""

from __future__ import annotations

import ctypes
import gc
import re

from compactnn.errors import CompactnnError

MIB = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6}
_UNITS |= {"mib": MIB, "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tib": 1 << 40}


def parse_memory(value: str | int) -> int:
    """Bytes of a budget such as ``"512MiB"``, ``"2GiB"``, ``"1.5GB"`` or ``536870912``.

    Example:
        >>> parse_memory("512MiB")
        536870912
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise CompactnnError(
            f"max_memory={value!r} is not a memory size: write e.g. '512MiB', '2GiB' or a "
            "number of bytes."
        )
    return int(float(m.group(1)) * _UNITS[unit])


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fixed_mmap_threshold(size: int = 128 << 10) -> None:
    """Serve allocations of ``size`` bytes and more from their own mappings, returned to the
    system when freed, and give back the heap's free top above ``size`` at once. glibc
    otherwise raises its threshold after the first large free (up to 32 MiB), after which
    each block's tensors come from a heap that keeps their pages. 128 KiB, not more: at
    1 MiB, the solver's many mid-sized temporaries fragmented the heap of a 28-block Llama's
    first block by about 450 MiB of freed but resident pages.

    Call it before anything large is allocated (before the skeleton is built): glibc serves
    a large request from free heap space whenever it has some, whatever the threshold, and
    keeps those pages resident once freed. Building the skeleton under the dynamic threshold
    left a 1 GiB heap (every parameter allocated, then moved to ``meta``) that the first
    block's activations and solver then dirtied: 300-600 MiB more peak, varying from run to
    run with the order in which the free chunks were reused.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, size)  # M_MMAP_THRESHOLD (fixing it turns the dynamic rule off)
        libc.mallopt(-1, size)  # M_TRIM_THRESHOLD: return a free heap top above it on free


def trim() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _status() -> dict[str, int]:
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM") if k in fields}


def rss() -> int:
    """Resident set size of this process now, in bytes (0 where unknown)."""
    return _status().get("VmRSS", 0)


def reset_peak() -> bool:
    """Restart the high-water mark at the current RSS (Linux); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """High-water mark of the resident set size, in bytes (since :func:`reset_peak`)."""
    return _status().get("VmHWM", 0)


def block_need(
    block_bytes: int,
    widths: list[int],
    act_bytes: int,
    batch_tokens: int,
    outside_bytes: int,
    workspace: int = 0,
) -> int:
    """Estimated bytes a streamed GPTQ-family run needs on top of its process.

    Args:
        block_bytes: float32 bytes of one block's parameters.
        widths: input widths of the block's linear layers (Hessians are ``width**2``).
        act_bytes: bytes of one hidden-state stream over all calibration batches.
        batch_tokens: tokens of the largest calibration batch times the widest layer input.
        outside_bytes: float32 bytes of the weights outside the blocks (embeddings, head).
        workspace: bytes of a solver's bounded temporaries (GPTQ's clip-range search).

    The block lives about three times (its float weights, the float copy whose outputs are
    the targets, the quantized twins with their dequantized weights); up to three Hessians
    of the widest layer with GPTQ's inverse factor; four hidden-state streams (quantized and
    float, in and out); a batch's intermediate activations; the head quantized beside the
    float one.
    """
    hess = 4 * max(widths, default=0) ** 2
    return int(
        3 * block_bytes
        + 4 * hess
        + 4 * act_bytes
        + 8 * batch_tokens
        + 2 * outside_bytes
        + workspace
    )
