"""Loading a ``torch.export`` archive (``.pt2``) without running code from the file.

``torch.export.load`` unpickles with ``weights_only=False`` every weight or constant whose
payload config says ``use_pickle`` (and every ``custom_obj_``/``opaque_obj_`` constant), falls
back to ``weights_only=False`` when the sample inputs fail the safe unpickler, loads native
AOTInductor libraries, ``sympify``-s (``eval``-s) the symbolic shape strings, imports the
modules a tree spec names (``default_factory_module``, ``__enum__``), and resolves node
targets to any ``torch.*`` attribute (``torch.os.system`` included).

:func:`check_archive` reads the archive as data first and refuses all of that; the bytes it
checked are the bytes handed to torch, so the file cannot change in between.
"""

from __future__ import annotations

import io
import json
import math
import operator
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from compactnn.errors import CompactnnError, cut, first_line

# Every entry a plain ``torch.export.save`` writes, relative to the archive's root folder.
_ENTRY = re.compile(
    r"archive_format|archive_version|byteorder|\.data/[\w.]+|models/\w+\.json"
    r"|data/weights/(\w+_weights_config\.json|weight_\d+)"
    r"|data/constants/(\w+_constants_config\.json|tensor_\d+)"
    r"|data/sample_inputs/\w+\.pt|extra/[\w.-]+"
)
_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims|higher_order)\.\w+(\.\w+)?")
_SAFE_FUNCTIONS = {
    **{
        f"_operator.{n}": getattr(operator, n)
        for n in (
            "getitem add sub mul truediv floordiv mod pow neg pos eq ne lt le gt ge and_ or_ not_"
        ).split()
    },
    **{f"math.{n}": getattr(math, n) for n in ("trunc", "floor", "ceil", "sqrt")},
    **{
        f"torch.{n}": getattr(torch, n)
        for n in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt")
    },
}
# Names torch writes in shape expressions (``sympy.srepr`` form: ``Mul(Integer(2),
# Symbol('s0', positive=True, integer=True))``); any other identifier must be a symbol (s0).
_SYMPY_NAMES = frozenset(
    "FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv "
    "LShift RShift IsNonOverlappingAndDenseIndicator RoundToInt RoundDecimal ToFloat FloatPow "
    "PowByNatural IntTrueDiv FloatTrueDiv TruncToFloat TruncToInt Identity Max Min Eq Ne Lt "
    "Le Gt Ge And Or Not Abs Pow Mul Add oo zoo nan True False floor ceiling sqrt Symbol "
    "Integer Float Rational Half One Zero NegativeOne Infinity NegativeInfinity IntInfinity "
    "NegativeIntInfinity int_oo StrictLessThan LessThan StrictGreaterThan GreaterThan "
    "Equality Unequality BooleanTrue BooleanFalse true false precision positive negative "
    "integer real nonnegative nonpositive finite infinite zero nonzero rational even odd "
    "commutative extended_real".split()
)
_EXPR_CHARS = re.compile(r"[\w\s+\-*/%(),.<>=!&|~^']*")
_QUOTED = re.compile(r"'([^']*)'")
_NUMBER = re.compile(r"\d+(\.\d*)?([eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_]\w*")
_SYMBOL = re.compile(r"[a-z]{1,4}\d+")
# Tree-spec JSON keys that make torch import a module by name.
_IMPORTING_KEYS = ("default_factory_module", "__enum__")
# Zip-bomb limits, checked on the sizes the zip directory declares (both zipfile and torch's
# reader stop at them) before an entry is read. torch.export.save stores every entry
# uncompressed, so a real archive unpacks to about its own size.
_SMALL_CAP = 1 << 20  # archive_format, archive_version, byteorder, .data/*
_TEXT_CAP = 256 << 20  # models/*.json, the payload configs, extra/*, sample inputs
_MAX_RATIO = 100  # an entry, or the whole archive, may unpack to 100x its packed size...
_RATIO_FLOOR = 1 << 20  # ...unless the entry unpacks to at most 1 MiB (64 MiB for the whole)
_TENSOR_ENTRY = re.compile(r"data/(weights|constants)/(weight|tensor)_\d+")


def load_exported_program(path: Path, *, trust_pickle: bool = False):
    """The ``ExportedProgram`` in ``path``; refuses archives that would run code unless trusted.

    Args:
        path: the ``.pt2`` file.
        trust_pickle: the user trusts the file's author (``--trust-pickle``): load it as
            ``torch.export.load`` does, pickles included.

    Raises:
        CompactnnError: the file is missing, not an archive, or (untrusted) needs code to load.

    Example:
        >>> program = load_exported_program(Path("net.pt2"))  # doctest: +SKIP
    """
    if not path.is_file():
        raise CompactnnError(f"torch.export archive {str(path)!r} does not exist.")
    data = path.read_bytes()
    if not trust_pickle:
        check_archive(data, str(path))
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        why = first_line(exc)
        raise CompactnnError(f"{str(path)!r} is not a torch.export archive: {why}") from exc
    if not trust_pickle:
        check_graph(program.graph_module, str(path))
    return program


def _refuse(name: str, why: str) -> CompactnnError:
    return CompactnnError(
        f"refusing to load {name!r}: {why}, and loading that runs code from the file. Pass "
        "--trust-pickle (trust_pickle=True) only if you trust its author, or export it again "
        "with plain tensor weights (torch.export.save of a model without tensor subclasses)."
    )


def check_archive(data: bytes, name: str) -> None:
    """Raise ``CompactnnError`` unless the archive in ``data`` loads without running code.

    Checks, reading only zip entries and JSON: every entry is one a plain
    ``torch.export.save`` writes (no AOTInductor library, no legacy pickled state dict, no
    custom or opaque objects); no weight or constant is pickled; the sample inputs pass
    ``torch.load(weights_only=True)``; graph nodes call only ``torch.ops.aten/prims`` and
    higher-order operators or plain arithmetic; shape expressions are arithmetic on symbols.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as exc:
        why = first_line(exc)
        raise CompactnnError(f"{name!r} is not a torch.export archive: {why}") from exc
    root = names[0].split("/", 1)[0] + "/" if names else ""
    if len(set(names)) != len(names):  # zipfile reads the last copy, torch maybe another
        raise _refuse(name, "it holds two entries of the same name")
    entries = {}
    for full in names:
        rel = full[len(root) :] if full.startswith(root) else full
        if not full.startswith(root) or not _ENTRY.fullmatch(rel):
            why = f"it holds {cut(full)!r}, which a plain torch.export.save never writes"
            raise _refuse(name, why)
        entries[rel] = full
    if "archive_version" not in entries:
        raise _refuse(name, "it is in the legacy format, whose weights are pickled")
    _check_sizes_and_configs(archive, entries, len(data), name)
    for rel, full in entries.items():
        if rel.startswith("models/"):
            _check_program_json(archive.read(full).decode("utf-8", "replace"), name)
        elif rel.startswith("data/sample_inputs/"):
            inputs = archive.read(full)
            _check_nested_inflation(inputs, f"{name}:{rel}")
            try:
                torch.load(io.BytesIO(inputs), weights_only=True)
            except Exception:  # torch itself would retry with the full unpickler
                raise _refuse(name, "its example inputs need a full unpickler") from None


def _check_sizes_and_configs(
    archive: zipfile.ZipFile, entries: dict[str, str], packed: int, name: str
) -> None:
    """The zip-bomb checks, each before the entry it guards is read: metadata entries under
    their caps, the payload configs (read and checked), then every weight or constant entry
    no bigger than its tensors, and the whole archive under 100x its size."""
    infos = {info.filename: info for info in archive.infolist()}
    for rel, full in entries.items():
        if not _TENSOR_ENTRY.fullmatch(rel):
            _check_entry_size(infos[full], rel, name)
    declared: dict[str, int] = {}  # tensor entry -> the bytes its tensors span
    for rel, full in entries.items():
        if rel.endswith(("_weights_config.json", "_constants_config.json")):
            folder = rel.rsplit("/", 1)[0] + "/"
            _check_payload_config(_json(archive, full, name), name, rel, folder, declared)
    for rel, full in entries.items():
        if _TENSOR_ENTRY.fullmatch(rel):
            _check_tensor_entry_size(infos[full], rel, declared.get(rel, 0), name)
    _check_inflation(archive, packed, name)


def _too_big(name: str, why: str) -> CompactnnError:
    return CompactnnError(
        f"refusing to load {name!r}: {why} (a zip bomb?); export the model again with "
        "torch.export.save, which stores its entries uncompressed."
    )


def _check_entry_size(info: zipfile.ZipInfo, rel: str, name: str) -> None:
    """Refuse a metadata entry above its cap, or one that unpacks to over 100x its size."""
    small = rel.startswith((".data/", "archive_", "byteorder"))
    cap = _SMALL_CAP if small else _TEXT_CAP
    unpacks = f"its entry {cut(rel)!r} unpacks to {info.file_size} bytes"
    if info.file_size > cap:
        raise _too_big(name, f"{unpacks}, over {cap}")
    if info.file_size > max(_RATIO_FLOOR, _MAX_RATIO * info.compress_size):
        raise _too_big(name, f"{unpacks} from {info.compress_size}")


def _check_tensor_entry_size(info: zipfile.ZipInfo, rel: str, declared: int, name: str) -> None:
    """Refuse a compressed weight or constant entry that unpacks to more bytes than its
    tensors span (a stored one is only as big as the bytes already read)."""
    if info.file_size > max(declared, info.compress_size):
        raise _too_big(
            name,
            f"its entry {cut(rel)!r} unpacks to {info.file_size} bytes, more than the {declared} "
            "bytes its tensors declare",
        )


def _check_inflation(archive: zipfile.ZipFile, packed: int, name: str) -> None:
    """Refuse an archive whose entries unpack to over 100x its size (and over 64 MiB)."""
    total = sum(info.file_size for info in archive.infolist())
    if total > max(64 * _RATIO_FLOOR, _MAX_RATIO * packed):
        raise _too_big(name, f"its entries unpack to {total} bytes from a {packed}-byte file")


def _check_nested_inflation(data: bytes, name: str) -> None:
    """The inflation check for a zip inside the archive (the sample inputs' torch.save)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError):
        return  # not a zip: torch.load reads it as a legacy pickle, within its own size
    _check_inflation(archive, len(data), name)


def _json(archive: zipfile.ZipFile, entry: str, name: str) -> Any:
    try:
        return json.loads(archive.read(entry))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CompactnnError(f"{name!r} has a corrupt {entry!r}: {str(exc)[:200]}") from exc


def _check_payload_config(
    config: Any, name: str, rel: str, folder: str, declared: dict[str, int]
) -> None:
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise CompactnnError(f"{name!r} has a corrupt {rel!r}: no 'config' table.")
    for fqn, meta in items.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _refuse(name, f"its tensor {cut(fqn)!r} is stored as a pickle")
        if not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name"))):
            raise _refuse(name, f"its tensor {cut(fqn)!r} is an object, not raw tensor bytes")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _refuse(name, f"its tensor {cut(fqn)!r} has no tensor description")
        span = tensor_span_bytes(meta["tensor_meta"])
        if span is None:
            raise CompactnnError(f"{name!r} has a corrupt {rel!r}: tensor {cut(fqn)!r}'s shape.")
        entry = folder + meta["path_name"]
        declared[entry] = max(declared.get(entry, 0), span)


def tensor_span_bytes(meta: dict[str, Any]) -> int | None:
    """The bytes of storage a serialized tensor description reaches (``None`` when it is
    not sizes/strides/offset of plain integers); 16 bytes an element for an unknown dtype.

    Example:
        >>> ints = lambda *v: [{"as_int": i} for i in v]
        >>> tensor_span_bytes({"dtype": 7, "sizes": ints(2, 3), "strides": ints(3, 1),
        ...                    "storage_offset": {"as_int": 0}})
        24
    """

    def ints(items: Any) -> list[int] | None:
        if not isinstance(items, list):
            return None
        values = [i.get("as_int") if isinstance(i, dict) else None for i in items]
        return values if all(type(v) is int for v in values) else None

    sizes, strides = ints(meta.get("sizes")), ints(meta.get("strides"))
    offset = ints([meta.get("storage_offset", {"as_int": 0})])
    if sizes is None or strides is None or offset is None or len(sizes) != len(strides):
        return None
    if any(size <= 0 for size in sizes):
        return 0
    last = offset[0] + sum(
        (size - 1) * abs(stride) for size, stride in zip(sizes, strides, strict=True)
    )
    return (max(last, 0) + 1) * _element_size(meta.get("dtype"))


def _element_size(code: Any) -> int:
    try:
        from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

        return _SERIALIZE_TO_TORCH_DTYPE[code].itemsize
    except (ImportError, KeyError, TypeError, AttributeError):
        return 16  # the widest dtype (complex128): a bound that never refuses a real file


def _check_program_json(text: str, name: str) -> None:
    for key in _IMPORTING_KEYS:
        if key in text:
            raise _refuse(name, f"its input/output spec names a module to import ({key})")
    try:
        program = json.loads(text)
    except (ValueError, RecursionError) as exc:  # a nesting deeper than the parser's stack
        raise CompactnnError(f"{name!r} has a corrupt program: {str(exc)[:200]}") from exc
    for key, value in _walk(program):
        if key == "target" and isinstance(value, str):
            if not (_OP_TARGET.fullmatch(value) or value in _SAFE_FUNCTIONS):
                raise _refuse(name, f"its graph calls {cut(value)!r}, not a torch operator")
        elif key == "expr_str" and not safe_expression(value):
            raise _refuse(name, f"its shape expression {str(value)[:60]!r} is not arithmetic")


def _walk(node: Any):
    """Every ``(key, value)`` pair of nested dicts and lists, depth first."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def safe_expression(expr: Any) -> bool:
    """True when ``expr`` is arithmetic on shape symbols (``s0``) and known sympy names.

    torch parses these strings with ``sympy.sympify``, which evaluates Python; no attribute
    access, dunder names, builtins or unknown identifiers get through, and quoted strings may
    hold only a symbol name or a number.
    """
    if not isinstance(expr, str) or len(expr) > 10_000 or not _EXPR_CHARS.fullmatch(expr):
        return False
    quoted = _QUOTED.findall(expr)
    if not all(_SYMBOL.fullmatch(q) or _NUMBER.fullmatch(q) for q in quoted):
        return False
    rest = _NUMBER.sub(" ", _QUOTED.sub(" ", expr))
    if "." in rest or "'" in rest or "__" in rest:
        return False
    return all(_SYMBOL.fullmatch(ident) or ident in _SYMPY_NAMES for ident in _IDENT.findall(rest))


def check_graph(gm: torch.nn.Module, name: str) -> None:
    """Raise unless every call in the loaded graph is a torch operator or plain arithmetic."""
    safe = set(_SAFE_FUNCTIONS.values())
    for module in gm.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if node.op in ("call_module", "call_method"):
                raise _refuse(name, f"its graph calls {node.target!r}, not a torch operator")
            if node.op != "call_function":
                continue
            target = node.target
            ok = (
                isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "prims")
            ) or isinstance(target, torch._ops.HigherOrderOperator)
            if not ok and target not in safe:
                raise _refuse(name, f"its graph calls {target!r}, not a torch operator")
