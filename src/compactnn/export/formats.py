"""The hand-off formats of ``compactnn export``: name -> module with ``can_export`` / ``export``.

Each format module provides ``can_export(qmodel) -> str | None`` (None when the model goes
to that format exactly, else the reason) and ``export(qmodel, out, **opts) -> Path``. The
modules are imported only when a format is used, so a missing optional package (``gguf``,
``compressed-tensors``, ``onnx``) affects only its own format.

:func:`export` never writes over what is at ``out`` unless ``force=True``, and even then
only over an earlier export of the same format: a GGUF file (it starts with the GGUF magic),
an ONNX file (see :func:`replace_reason`), an earlier compressed-tensors folder; anything
else (a safetensors or PyTorch checkpoint, a folder of other files) is refused (see
:func:`check_out`).

Example:
    >>> [f.name for f in FORMATS]
    ['gguf', 'compressed-tensors', 'onnx']
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from compactnn.errors import CompactnnError
from compactnn.export.fs import check_file_path, force_option, names_folder

GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One format: its module and the keyword options its ``export`` takes."""

    name: str
    module: str
    summary: str
    options: tuple[str, ...] = ()


FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat(
        "gguf",
        "compactnn.export.gguf",
        "llama.cpp GGUF (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks) for Llama, Mistral and Qwen2 decoders",
        ("requantize", "tokenizer"),
    ),
    ExportFormat(
        "compressed-tensors",
        "compactnn.export.ctensors",
        "Hugging Face folder with a compressed-tensors quantization_config (transformers, vLLM)",
        ("tokenizer",),
    ),
    ExportFormat(
        "onnx",
        "compactnn.export.onnx_hf",
        "ONNX for transformers models: QDQ int8 or ONNX Runtime MatMulNBits",
        ("example", "accuracy_level", "min_cosine"),
    ),
)
NAMES = tuple(f.name for f in FORMATS)


def get_format(name: str) -> ExportFormat:
    """The format called ``name``.

    Raises:
        CompactnnError: for an unknown name (the known ones are listed).
    """
    for f in FORMATS:
        if f.name == name:
            return f
    raise CompactnnError(f"unknown export format {name!r}; use one of {', '.join(NAMES)}.")


def _module(fmt: ExportFormat):
    try:
        return importlib.import_module(fmt.module)
    except ModuleNotFoundError as exc:
        if exc.name != fmt.module:
            raise  # a missing dependency inside the module: its own message
        raise CompactnnError(
            f"the {fmt.name} export is not available in this installation ({fmt.module} is "
            "missing)."
        ) from exc


def can_export(name: str, model: nn.Module) -> str | None:
    """None when ``model`` goes to format ``name`` exactly, else the reason."""
    fmt = get_format(name)
    try:
        return _module(fmt).can_export(model)
    except CompactnnError as exc:  # a missing package or module is a reason too
        return str(exc)


def caveat(name: str, model: nn.Module) -> str | None:
    """What format ``name`` exports exactly but does not compress (e.g. ONNX layers left
    float32), from the format module's ``caveat(model)`` when it has one; else None."""
    try:
        module = _module(get_format(name))
    except CompactnnError:
        return None
    note = getattr(module, "caveat", None)
    return note(model) if note is not None else None


def run_note(name: str, model: nn.Module) -> str | None:
    """How the runtime must run what format ``name`` writes for ``model`` (e.g. a W8A8 ONNX
    file: ONNX Runtime's basic graph optimizations), from the format module's
    ``run_note(model)`` when it has one; else None."""
    try:
        module = _module(get_format(name))
    except CompactnnError:
        return None
    note = getattr(module, "run_note", None)
    return note(model) if note is not None else None


def capabilities(model: nn.Module) -> dict[str, str | None]:
    """Each format's :func:`can_export` answer for ``model``, in table order."""
    return {f.name: can_export(f.name, model) for f in FORMATS}


def out_path(name: str, out: str | os.PathLike) -> Path:
    """What format ``name`` writes for ``out``: the compressed-tensors folder itself; for
    gguf and onnx the file, or ``model.gguf`` / ``model.onnx`` in a folder (a path ending
    in a separator, and for onnx any path not ending in ``.onnx``, names a folder)."""
    path = Path(out)
    if get_format(name).name == "compressed-tensors":
        return path
    folder = path.is_dir() or names_folder(out) or (name == "onnx" and path.suffix != ".onnx")
    return path / f"model.{name}" if folder else path


def check_out(name: str, out: str | os.PathLike, *, force: bool = False, what: str = "out") -> Path:
    """Refuse, before any slow work, an output format ``name`` may not write; return the
    path it will write (:func:`out_path`).

    A file is replaced only with ``force``. The compressed-tensors folder must be new, empty,
    or (with ``force``) an earlier compressed-tensors export: a folder of other files is
    refused even with ``force``.

    Raises:
        CompactnnError: the message names ``what`` (``"out"``, ``"--out"``) and the fix.
    """
    fmt = get_format(name)
    if fmt.name == "compressed-tensors":
        return _module(fmt).check_out(out, force=force, what=what)
    suggest = f"model.{fmt.name}"
    path = check_file_path(out_path(name, out), what, force=force, suggest=suggest)
    check_replaceable(fmt.name, path, what)
    return path


def _sniff(head: bytes) -> str | None:
    """What a file starting with ``head`` is, when that is recognisable, else None."""
    if head.startswith(GGUF_MAGIC):
        return "a GGUF file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pt/.pth checkpoint is one)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (a PyTorch checkpoint)"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "a safetensors file"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    return None


def _is_onnx(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model (its graph only: no external data read)."""
    try:
        import onnx

        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # any parse failure means "not an ONNX model"
        return False
    return model.ir_version > 0 and model.HasField("graph")


def replace_reason(name: str, path: str | os.PathLike) -> str | None:
    """Why ``force`` may not replace the existing file at ``path`` with a format ``name``
    export, or None when it is an earlier export of that format or nothing is there. GGUF:
    the file starts with the GGUF magic. ONNX: it is no other recognisable file (GGUF, zip
    as PyTorch saves, pickle, safetensors, JSON) and its name ends in ``.onnx`` or it parses
    as an ONNX model.

    Example:
        >>> replace_reason("gguf", "no/such/file.gguf") is None
        True
    """
    p = Path(path)
    if not os.path.lexists(p):
        return None
    if p.is_dir():
        return "is a folder"
    if not p.is_file():
        return "is not a regular file"
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if name == "gguf" and head.startswith(GGUF_MAGIC):
        return None
    if name == "onnx" and _sniff(head) is None and (p.suffix.lower() == ".onnx" or _is_onnx(p)):
        return None  # named .onnx and nothing else recognisable, or it parses as ONNX
    kind = _sniff(head) or ("an empty file" if not head else "a file of unknown content")
    return f"is {kind}, not {'a GGUF' if name == 'gguf' else 'an ONNX'} file"


def check_replaceable(name: str, path: str | os.PathLike, what: str = "out") -> None:
    """Refuse, ``force`` or not, to replace an existing file that is not an earlier export
    of format ``name`` (see :func:`replace_reason`).

    Raises:
        CompactnnError: one line naming the file, what it is and the fix.
    """
    reason = replace_reason(name, path)
    if reason is not None:
        raise CompactnnError(
            f"{what} {str(path)!r} exists and {reason}: {force_option(what)} replaces only "
            f"an earlier {name.upper()} export; choose another path."
        )


def export(
    name: str, model: nn.Module, out: str | os.PathLike, *, force: bool = False, **opts: Any
) -> Path:
    """Export ``model`` to format ``name`` at ``out``; options a format does not take are
    refused rather than ignored (``None`` values are dropped first).

    Args:
        name: one of :data:`NAMES`.
        model: the compressed model; not modified.
        out: the file (gguf, onnx) or folder (compressed-tensors) to write.
        force: replace an earlier export of the same format (a GGUF or ONNX file, a
            compressed-tensors folder); without it an existing output is refused, and
            anything else is refused even with it (see :func:`check_out`).
        **opts: the format's options (:attr:`ExportFormat.options`).

    Raises:
        CompactnnError: unknown format, an option the format does not take, an output that
            exists (without ``force``) or holds other files, or the format's own refusal.

    Example:
        >>> export("gguf", qmodel, "out/tiny.gguf", force=True)  # doctest: +SKIP
    """
    fmt = get_format(name)
    opts = {k: v for k, v in opts.items() if v is not None and v is not False}
    extra = sorted(set(opts) - set(fmt.options))
    if extra:
        raise CompactnnError(
            f"the {name} export does not take {', '.join(extra)}; "
            f"it takes {', '.join(fmt.options) or 'no options'}."
        )
    if isinstance(opts.get("tokenizer"), (str, os.PathLike)):
        raise CompactnnError(
            f"tokenizer={str(opts['tokenizer'])!r:.80} is a path: pass the tokenizer object "
            "(e.g. transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)),"
            " or use `compactnn export ... --tokenizer DIR`, which checks the folder first."
        )
    module = _module(fmt)
    path = check_out(name, out, force=force)
    if fmt.name == "onnx":  # its module writes any file it is given: checked here
        return Path(module.export(model, path, **opts))
    return Path(module.export(model, out, force=force, **opts))
