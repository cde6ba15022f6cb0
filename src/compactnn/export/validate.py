"""The rules an artifact must follow, checked before anything is built from it.

Pure functions over the parsed header (plain JSON values) and the loaded tensors. They do not
rely on the digest: a header or tensor that was edited and re-hashed still has to follow every
rule here, so a malformed artifact is refused with an :class:`ArtifactError` instead of
crashing, allocating what the file cannot back, or loading an impossible grid.

Types are exact: a JSON ``true`` is not an integer, ``1.0`` is not an integer either.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import torch
from torch import nn

from compactnn.core.modules import is_hf_conv1d
from compactnn.core.packing import packed_nbytes
from compactnn.core.qlayers import conv_kwargs, format_name
from compactnn.core.spec import GRANULARITIES, RANGE_METHODS, QuantSpec
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export.versions import version_problem

FORMAT_VERSION = 2
HEADER = "compactnn.json"
TENSORS = "model.safetensors"
FILE_ROLES = {"tensors": "model.safetensors", "recipe": "recipe.yaml"}
STAGED = re.compile(r"^\.cnn-[0-9a-f]{16}-(model\.safetensors|recipe\.yaml)$")
MAX_HEADER_BYTES = 64 << 20
KINDS: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TOP = {
    "format": str,
    "format_version": int,
    "digest": str,
    "model_class": str,
    "recipe": (str, type(None)),
    "layers": dict,
    "aliases": dict,
    "folded_bn": list,
    "float_layers": dict,
    "extra": dict,
    "sparse": dict,
    "files": dict,
}
_SPEC_KEYS = {"bits", "symmetric", "granularity", "group_size", "range_method", "percentile"}
_CONV_KEYS = {
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def bad(where: str, problem: str) -> ArtifactError:
    """The error for one broken field: names the field, the problem and the fix."""
    return ArtifactError(
        f"artifact field {where} {problem}; the artifact is damaged or was edited by hand: "
        "re-save it with compactnn.save."
    )


def is_int(x: Any) -> bool:
    """An integer that is not a bool."""
    return type(x) is int


def _int_list(x: Any, where: str, n: int | None, lo: int) -> list[int]:
    if not isinstance(x, list) or (n is not None and len(x) != n):
        raise bad(where, f"must be a list of {n or 'some'} integers, got {x!r:.80}")
    if not all(is_int(v) and lo <= v < 2**31 for v in x):
        raise bad(where, f"must hold integers in [{lo}, 2**31), got {x!r:.80}")
    return x


def is_hex64(x: Any) -> bool:
    """A SHA-256 hex digest (64 lowercase hex digits)."""
    return isinstance(x, str) and bool(_HEX64.fullmatch(x))


def canonical_json(obj: Any) -> bytes:
    """The one byte string a JSON value hashes as (sorted keys, no spaces, ASCII)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def header_digest(header: dict[str, Any]) -> str:
    """SHA-256 of the header without its ``digest`` field and without file names.

    The header lists every file of the artifact with its size and SHA-256, so this one digest
    covers every byte of the artifact. File names are left out: they only locate a file, whose
    content is still checked against its hash.
    """
    body = {k: v for k, v in header.items() if k != "digest"}
    files = body.get("files")
    if isinstance(files, dict):
        body["files"] = {
            role: {k: v for k, v in f.items() if k != "name"} if isinstance(f, dict) else f
            for role, f in files.items()
        }
    return hashlib.sha256(canonical_json(body)).hexdigest()


def parse_header(raw: bytes, where: str) -> dict[str, Any]:
    """Strict JSON: UTF-8, no duplicate keys, no NaN or infinity, an object at the top."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate key")
        return out

    def const(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} overflows a float")
        return value

    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=const, parse_float=finite
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ArtifactError(f"{where} is corrupt ({exc}); re-save the artifact.") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"{where} is corrupt: not a JSON object; re-save the artifact.")
    return header


def check_version(header: dict[str, Any], where: str) -> None:
    """The format marker and version, checked first so old artifacts get a clear message."""
    if header.get("format") != "compactnn":
        raise ArtifactError(f"{where} is not a compactnn header.")
    problem = version_problem(header, where, FORMAT_VERSION)  # older, newer or not a number
    if problem is not None:
        raise ArtifactError(problem)


def check_header(header: dict[str, Any]) -> None:
    """Top-level keys, their types, the file list and every layer entry."""
    missing = sorted(set(_TOP) - set(header))
    unknown = sorted(set(header) - set(_TOP))
    if missing or unknown:
        raise bad("set", f"is wrong (missing {missing}, unknown {unknown})")
    for key, typ in _TOP.items():
        if not isinstance(header[key], typ) or isinstance(header[key], bool):
            raise bad(repr(key), f"has the wrong type {type(header[key]).__name__}")
    if not _HEX64.fullmatch(header["digest"]):
        raise bad("'digest'", "is not 64 lowercase hex digits")
    check_printable(header)
    _check_files(header["files"], header["recipe"])
    for key in ("aliases", "float_layers"):
        if not all(isinstance(v, str) for v in header[key].values()):
            raise bad(repr(key), "must map names to strings")
    if not all(isinstance(v, str) for v in header["folded_bn"]):
        raise bad("'folded_bn'", "must list module names")
    for name, entry in header["layers"].items():
        check_layer(name, entry)
    for key, entry in header["sparse"].items():
        if not isinstance(entry, dict):
            raise bad(f"sparse[{key!r}]", "must be an object")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NOTES_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # notes may span lines


def control_char(text: str, *, newline: bool = False) -> str | None:
    """The first C0/C1 control character of ``text`` as ``U+XXXX`` (``None`` if it has none);
    ``newline=True`` allows ``\\n``."""
    found = (_NOTES_CONTROL if newline else _CONTROL).search(text)
    return None if found is None else f"U+{ord(found.group()):04X}"


def check_printable(header: dict[str, Any], fail: Any = None) -> None:
    """No string of the header (key or value, at any depth) holds a control character.

    ``load`` and the commands print these strings; an escape sequence would drive the user's
    terminal. Only the notes (``extra.notes``) may hold newlines. ``fail(where, problem)``
    makes the error (default :func:`bad`: a damaged artifact; ``save`` names the user's input).
    """
    bad = fail or globals()["bad"]
    stack: list[tuple[str, Any]] = [("", header)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            code = control_char(value, newline=where.startswith("['extra']['notes']"))
            if code is not None:
                raise bad(where, f"holds the control character {code}")
        elif isinstance(value, dict):
            for k, v in value.items():
                code = control_char(k) if isinstance(k, str) else None
                if code is not None:
                    raise bad(
                        f"{where or 'header'} key {k!r:.80}", f"holds the control character {code}"
                    )
                stack.append((f"{where}[{k!r:.80}]", v))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))


def _check_files(files: dict[str, Any], recipe: str | None) -> None:
    if "tensors" not in files or set(files) - set(FILE_ROLES):
        raise bad("'files'", f"must list 'tensors' (and 'recipe'), got {sorted(files)}")
    if ("recipe" in files) != (recipe is not None):
        raise bad("'files'", "must list a recipe file exactly when 'recipe' names one")
    for role, f in files.items():
        if not isinstance(f, dict) or set(f) != {"name", "bytes", "sha256"}:
            raise bad(f"files[{role!r}]", "must be {name, bytes, sha256}")
        name = f["name"]
        staged = isinstance(name, str) and STAGED.fullmatch(name)
        if name != FILE_ROLES[role] and not (staged and staged.group(1) == FILE_ROLES[role]):
            raise bad(f"files[{role!r}].name", f"is not a file name of this format: {name!r:.80}")
        if not is_int(f["bytes"]) or f["bytes"] < 0:
            raise bad(f"files[{role!r}].bytes", "must be a non-negative integer")
        if not isinstance(f["sha256"], str) or not _HEX64.fullmatch(f["sha256"]):
            raise bad(f"files[{role!r}].sha256", "is not 64 lowercase hex digits")


def check_spec(d: Any, where: str, *, weight: bool) -> QuantSpec:
    """A saved ``QuantSpec``: every field present, of its exact type, within range."""
    if not isinstance(d, dict) or not _SPEC_KEYS <= set(d) <= {*_SPEC_KEYS, "signed", "dynamic"}:
        raise bad(where, f"must hold the fields {sorted(_SPEC_KEYS)} (+ signed, dynamic)")
    checks = {
        "bits": is_int(d["bits"]) and 1 <= d["bits"] <= 8,
        "symmetric": isinstance(d["symmetric"], bool),
        "granularity": d["granularity"] in GRANULARITIES,
        "group_size": d["group_size"] is None or (is_int(d["group_size"]) and d["group_size"] > 0),
        "range_method": d["range_method"] in RANGE_METHODS,
        "percentile": type(d["percentile"]) in (int, float) and 50 < d["percentile"] <= 100,
        "signed": d.get("signed") is None or isinstance(d.get("signed"), bool),
        "dynamic": d.get("dynamic", False) is False or (d["dynamic"] is True and not weight),
    }
    for field, ok in checks.items():
        if not ok:
            value = d.get(field)
            raise bad(f"{where}.{field}", f"is out of range or of the wrong type: {value!r:.40}")
    if weight and d["symmetric"] and d.get("signed") is False:
        raise bad(f"{where}.signed", "must not be false on a symmetric weight grid")
    try:
        return QuantSpec(**d)
    except (CompactnnError, TypeError) as exc:
        raise bad(where, f"is not a valid spec ({exc})") from exc


def check_layer(name: str, entry: Any) -> None:
    """One quantized layer's entry: kind, shape, specs, format label and conv geometry."""
    where = f"layers[{name!r}]"
    if not isinstance(entry, dict) or not isinstance(name, str) or not name:
        raise bad(where, "must be an object under a module name")
    kind = entry.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise bad(f"{where}.kind", f"must be one of {sorted(KINDS)}, got {kind!r:.40}")
    keys = {"kind", "format", "shape", "weight_spec", "act_spec", "bias"}
    keys |= {"conv"} if kind != "Linear" else set()
    if set(entry) != keys:
        raise bad(where, f"must hold exactly {sorted(keys)}")
    ndim = {"Linear": 2, "Conv1d": 3, "Conv2d": 4}[kind]
    shape = _int_list(entry["shape"], f"{where}.shape", ndim, 1)
    wspec = check_spec(entry["weight_spec"], f"{where}.weight_spec", weight=True)
    if entry["act_spec"] is not None:
        check_spec(entry["act_spec"], f"{where}.act_spec", weight=False)
    if not isinstance(entry["bias"], bool):
        raise bad(f"{where}.bias", "must be true or false")
    base = format_name(wspec)
    if entry["format"] not in (base, base + "-codebook", base + "-basis"):
        raise bad(f"{where}.format", f"is {entry['format']!r:.40}, the spec says {base!r}")
    group = wspec.group_size or 1
    if wspec.granularity == "group" and math.prod(shape[1:]) % group:
        raise bad(f"{where}.weight_spec.group_size", f"{group} does not divide {shape[1:]}")
    if kind != "Linear":
        _check_conv(entry["conv"], f"{where}.conv", shape, entry["bias"])


def _check_conv(conv: Any, where: str, shape: list[int], bias: bool) -> None:
    if not isinstance(conv, dict) or set(conv) != _CONV_KEYS:
        raise bad(where, f"must hold exactly {sorted(_CONV_KEYS)}")
    n = len(shape) - 2
    for key in ("kernel_size", "stride", "dilation"):
        _int_list(conv[key], f"{where}.{key}", n, 1)
    if conv["padding"] not in ("same", "valid"):
        _int_list(conv["padding"], f"{where}.padding", n, 0)
    for key in ("in_channels", "out_channels", "groups"):
        if not is_int(conv[key]) or not 1 <= conv[key] < 2**31:
            raise bad(f"{where}.{key}", f"must be a positive integer, got {conv[key]!r:.40}")
    if conv["padding_mode"] not in _PADDING_MODES:
        raise bad(f"{where}.padding_mode", f"must be one of {_PADDING_MODES}")
    if conv["bias"] is not bias:
        raise bad(f"{where}.bias", "disagrees with the layer's bias flag")
    g = conv["groups"]
    if conv["in_channels"] % g or conv["out_channels"] % g:
        raise bad(f"{where}.groups", f"{g} does not divide the channels")
    implied = [conv["out_channels"], conv["in_channels"] // g, *conv["kernel_size"]]
    if implied != shape:
        raise bad(f"{where}", f"geometry implies weight shape {implied}, the layer says {shape}")


def model_class_name(model: nn.Module) -> str:
    """How the header names a model's class."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def check_fits_skeleton(name: str, entry: dict[str, Any], module: nn.Module) -> None:
    """The saved layer replaces ``module``: same kind, weight shape and conv geometry."""
    where = f"layers[{name!r}]"
    if entry["kind"] == "Linear" and is_hf_conv1d(module):  # GPT-2: weight stored (in, out)
        if list(module.weight.shape)[::-1] != entry["shape"]:
            raise ArtifactError(
                f"{where} has weight shape {entry['shape']} but the skeleton's Conv1D holds "
                f"{list(module.weight.shape)[::-1]}: pass the float model it was made from."
            )
        return
    if not isinstance(module, KINDS[entry["kind"]]):
        raise ArtifactError(
            f"{where} is a {entry['kind']} but the skeleton's module {name!r} is a "
            f"{type(module).__name__}: pass the float model the artifact was made from."
        )
    if list(module.weight.shape) != entry["shape"]:
        raise ArtifactError(
            f"{where} has weight shape {entry['shape']} but the skeleton's module is "
            f"{list(module.weight.shape)}: pass the float model the artifact was made from."
        )
    if entry["kind"] == "Linear":
        return
    skel = conv_kwargs(module)
    skel = {k: list(v) if isinstance(v, tuple) else v for k, v in skel.items()}
    diff = sorted(k for k in _CONV_KEYS - {"bias"} if skel[k] != entry["conv"][k])
    if diff or (skel["bias"] and not entry["bias"]):
        raise ArtifactError(
            f"{where} conv geometry differs from the skeleton's in {diff or ['bias']}: pass "
            "the float model the artifact was made from."
        )


def _rows_groups(entry: dict[str, Any], spec: QuantSpec) -> tuple[int, int]:
    shape = entry["shape"]
    if spec.granularity == "tensor":
        return 1, 1
    if spec.granularity == "channel":
        return shape[0], 1
    return shape[0], math.prod(shape[1:]) // spec.group_size


def is_codebook(entry: dict[str, Any]) -> bool:
    """A layer entry whose grid is a codebook (levels, or a binary basis)."""
    return entry["format"].endswith(("-codebook", "-basis"))


def layer_tensor_specs(name: str, entry: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple]]:
    """Every tensor a quantized layer stores: key -> (dtype, shape).

    A codebook layer's scale and zero point are listed too: an artifact may omit them
    (they are unused), and :func:`fill_codebook_defaults` then supplies ones and zeros.
    """
    spec = QuantSpec.from_dict(entry["weight_spec"])
    rg = _rows_groups(entry, spec)
    out = {
        f"{name}.weight.packed": (
            torch.uint8,
            (packed_nbytes(math.prod(entry["shape"]), spec.bits),),
        ),
        f"{name}.weight.scale": (torch.float16, rg),
    }
    if not spec.symmetric:
        out[f"{name}.weight.zero"] = (spec.qtype.storage_dtype, rg)
    if entry["format"].endswith("-codebook"):
        out[f"{name}.weight.levels"] = (torch.float16, (*rg, spec.qtype.levels))
    if entry["format"].endswith("-basis"):
        out[f"{name}.weight.basis"] = (torch.float16, (*rg, spec.bits))
    if entry["act_spec"] is not None:
        out[f"{name}.input.qparams"] = (torch.float32, (2,))
    return out


def optional_tensor_specs(
    name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.dtype, tuple]]:
    """Tensors a layer may store: a non-uniform input grid ``input.levels`` (float16,
    ``2**bits`` sorted levels), only on a layer with an input grid."""
    key = f"{name}.input.levels"
    if key not in tensors:
        return {}
    if entry["act_spec"] is None:
        raise bad(f"tensor {key!r}", "belongs to a layer without an input grid")
    levels = QuantSpec.from_dict(entry["act_spec"]).qtype.levels
    return {key: (torch.float16, (levels,))}


def fill_codebook_defaults(
    name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """A codebook layer's unused scale (ones) and zero point (zeros) where the artifact
    omits them (artifacts written before they were omitted store them)."""
    if not is_codebook(entry):
        return
    spec = QuantSpec.from_dict(entry["weight_spec"])
    rg = _rows_groups(entry, spec)
    tensors.setdefault(f"{name}.weight.scale", torch.ones(rg, dtype=torch.float16))
    if not spec.symmetric:
        tensors.setdefault(f"{name}.weight.zero", torch.zeros(rg, dtype=spec.qtype.storage_dtype))


def check_tensor_meta(key: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    """A tensor of the dtype and shape the format (or the skeleton) implies."""
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ArtifactError(
            f"tensor {key!r} of the artifact is {str(t.dtype).removeprefix('torch.')} "
            f"{list(t.shape)}, the format needs {str(dtype).removeprefix('torch.')} "
            f"{list(shape)}: the artifact is damaged; re-save it."
        )


def _in_grid(key: str, values: torch.Tensor, lo: int, hi: int, integral: bool) -> None:
    v = values.double()
    if not torch.isfinite(v).all() or (v < lo).any() or (v > hi).any():
        raise ArtifactError(f"tensor {key!r} holds a zero point outside the grid [{lo}, {hi}].")
    if integral and not torch.equal(v, v.round()):
        raise ArtifactError(f"tensor {key!r} holds a zero point that is not an integer.")


def _positive(key: str, values: torch.Tensor) -> None:
    v = values.float()
    if not torch.isfinite(v).all() or not (v > 0).all():
        raise ArtifactError(f"tensor {key!r} holds a scale that is not finite and > 0.")


def check_layer_values(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Scales finite and > 0, zero points on the grid, codebooks finite, act qparams sane.

    Codes need no check: ``bits``-wide packed codes cannot leave their grid.
    """
    spec = QuantSpec.from_dict(entry["weight_spec"])
    _positive(f"{name}.weight.scale", tensors[f"{name}.weight.scale"])
    zero = tensors.get(f"{name}.weight.zero")
    if zero is not None:
        _in_grid(f"{name}.weight.zero", zero, spec.qtype.qmin, spec.qtype.qmax, True)
    for kind in ("levels", "basis"):
        book = tensors.get(f"{name}.weight.{kind}")
        if book is not None and not torch.isfinite(book.float()).all():
            raise ArtifactError(f"tensor {f'{name}.weight.{kind}'!r} holds non-finite values.")
    act_levels = tensors.get(f"{name}.input.levels")
    if act_levels is not None:
        a = act_levels.float()
        if not torch.isfinite(a).all() or (a[1:] < a[:-1]).any():
            raise ArtifactError(
                f"tensor {name + '.input.levels'!r} must hold finite levels in increasing order."
            )
    qparams = tensors.get(f"{name}.input.qparams")
    if entry["act_spec"] is not None:
        aspec = QuantSpec.from_dict(entry["act_spec"])
        _positive(f"{name}.input.qparams", qparams[:1])
        _in_grid(f"{name}.input.qparams", qparams[1:], aspec.qtype.qmin, aspec.qtype.qmax, True)
