"""What the command line says about a Hugging Face checkpoint stored in bfloat16 or float16:
compactnn computes in float32 (``model_io`` loads such a folder upcast), so the float model it
measures is twice the checkpoint's size; the user is told once, and the artifact's size is also
compared with the checkpoint as stored."""

from __future__ import annotations

from pathlib import Path

from compactnn.commands._units import human_bytes
from compactnn.errors import CompactnnError
from compactnn.export.user_files import index_weight_map

_HALF = {"BF16": "bfloat16", "F16": "float16"}  # safetensors' dtype names
_FLOAT = {"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def _weight_files(folder: Path) -> list[Path]:
    """The ``.safetensors`` files transformers reads from ``folder`` (the index's shards, or
    ``model.safetensors``, which transformers prefers); empty when there are none."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:  # a hostile index (nested too deep, not an object): the loader refuses it
            names = set(index_weight_map(index, "").values())
        except CompactnnError:
            return []
        files = [folder / n for n in sorted(names)]
        return files if all(f.is_file() for f in files) else []
    return []


def stored_half(spec: str) -> tuple[str, int] | None:
    """``(dtype, bytes)`` when the Hugging Face folder ``spec`` stores its floating-point
    weights in bfloat16 or float16 (most of them, by count): the dtype's name and the bytes of
    its weight files; None for anything else (float32 weights, a file, a reference model).
    Only the files' headers are read.

    Example:
        >>> stored_half("no-such-folder") is None
        True
    """
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        return None
    files = _weight_files(folder)
    if not files:
        return None
    from safetensors import safe_open

    counts: dict[str, int] = {}
    try:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    dtype = f.get_slice(key).get_dtype()
                    if dtype in _FLOAT:
                        counts[dtype] = counts.get(dtype, 0) + 1
    except Exception:  # an unreadable file: the loader's own error says so
        return None
    if not counts:
        return None
    most = max(counts, key=lambda d: counts[d])
    if most not in _HALF:
        return None
    return _HALF[most], sum(p.stat().st_size for p in files)


def _ratio(size: int, stored: int) -> str:
    """``"2.95x smaller"`` (``size`` against ``stored`` bytes), or ``"1.05x larger"``."""
    return f"{stored / size:.2f}x smaller" if size <= stored else f"{size / stored:.2f}x larger"


def upcast_note(spec: str) -> str | None:
    """The note printed once when ``spec`` is a bfloat16/float16 checkpoint, else None.

    Example:
        >>> upcast_note("no-such-folder") is None
        True
    """
    half = stored_half(spec)
    if half is None:
        return None
    dtype, size = half
    return (
        f"note: {spec} stores its weights in {dtype} ({human_bytes(size)}); compactnn computes "
        f"in float32, so it loaded an upcast float32 copy (about twice the memory), and the "
        f"float model it measures and compares with is that float32 copy, not the {dtype} "
        "checkpoint."
    )


def checkpoint_comparison(size: int, spec: str) -> str:
    """``"; bfloat16 checkpoint 899.4 KiB (920,976 B), 2.95x smaller"`` for an artifact of
    ``size`` bytes made from the bfloat16/float16 folder ``spec``; ``""`` for anything else
    (appended to the float32 comparison of ``compactnn compress``'s artifact line).

    Example:
        >>> checkpoint_comparison(1000, "no-such-folder")
        ''
    """
    half = stored_half(spec)
    if half is None or size <= 0:
        return ""
    dtype, stored = half
    return f"; {dtype} checkpoint {human_bytes(stored)} ({stored:,} B), {_ratio(size, stored)}"


def float_row_note(spec: str | None, float_bytes: int, size: int | None = None) -> str | None:
    """The note under a table whose float row (``float_bytes``: its float32 copy) came from the
    bfloat16/float16 folder ``spec``: the checkpoint as stored, and how much smaller the
    compressed model (``size`` bytes, when there is one) is than it; None for anything else.

    Example:
        >>> float_row_note("no-such-folder", 2048) is None
        True
    """
    half = stored_half(spec) if spec else None
    if half is None:
        return None
    dtype, stored = half
    than = f": the compressed model is {_ratio(size, stored)} than it" if size else ""
    return (
        f"the float row is the float32 copy compactnn computes in ({human_bytes(float_bytes)}); "
        f"the {dtype} checkpoint it was loaded from, {spec}, is {human_bytes(stored)} "
        f"({stored:,} B){than}"
    )
