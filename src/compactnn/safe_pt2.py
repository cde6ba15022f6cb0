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

from compactnn.errors import CompactnnError

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
        raise CompactnnError(f"{str(path)!r} is not a torch.export archive: {exc}") from exc
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
        raise CompactnnError(f"{name!r} is not a torch.export archive: {exc}") from exc
    root = names[0].split("/", 1)[0] + "/" if names else ""
    entries = {}
    for full in names:
        rel = full[len(root) :] if full.startswith(root) else full
        if not full.startswith(root) or not _ENTRY.fullmatch(rel):
            raise _refuse(name, f"it holds {full!r}, which a plain torch.export.save never writes")
        entries[rel] = full
    if "archive_version" not in entries:
        raise _refuse(name, "it is in the legacy format, whose weights are pickled")
    for rel, full in entries.items():
        if rel.endswith(("_weights_config.json", "_constants_config.json")):
            _check_payload_config(_json(archive, full, name), name, rel)
        elif rel.startswith("models/"):
            _check_program_json(archive.read(full).decode("utf-8", "replace"), name)
        elif rel.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(archive.read(full)), weights_only=True)
            except Exception:  # torch itself would retry with the full unpickler
                raise _refuse(name, "its example inputs need a full unpickler") from None


def _json(archive: zipfile.ZipFile, entry: str, name: str) -> Any:
    try:
        return json.loads(archive.read(entry))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CompactnnError(f"{name!r} has a corrupt {entry!r}: {exc}") from exc


def _check_payload_config(config: Any, name: str, rel: str) -> None:
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise CompactnnError(f"{name!r} has a corrupt {rel!r}: no 'config' table.")
    for fqn, meta in items.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _refuse(name, f"its tensor {fqn!r} is stored as a pickle")
        if not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name"))):
            raise _refuse(name, f"its tensor {fqn!r} is an object, not raw tensor bytes")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _refuse(name, f"its tensor {fqn!r} has no tensor description")


def _check_program_json(text: str, name: str) -> None:
    for key in _IMPORTING_KEYS:
        if key in text:
            raise _refuse(name, f"its input/output spec names a module to import ({key})")
    try:
        program = json.loads(text)
    except ValueError as exc:
        raise CompactnnError(f"{name!r} has a corrupt program: {exc}") from exc
    for key, value in _walk(program):
        if key == "target" and isinstance(value, str):
            if not (_OP_TARGET.fullmatch(value) or value in _SAFE_FUNCTIONS):
                raise _refuse(name, f"its graph calls {value!r}, not a torch operator")
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
