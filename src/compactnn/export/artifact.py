"""Packed artifacts: ``save`` and ``load`` of compressed models.

An artifact is a directory:

* ``model.safetensors``: bit-packed weight codes (``<layer>.weight.packed``), their float16
  scales and integer zero points (or a codebook: ``weight.levels``, or the binary-basis
  coefficients ``weight.basis``), activation grids (``input.qparams``, ``input.levels``),
  and every other tensor as stored.
* ``recipe.yaml``: the recipe that produced the model (absent when there is none).
* ``compactnn.json``: the header: format version, per-layer format and geometry, and a
  manifest of the files above (name, size, SHA-256) with one ``digest`` over the header
  itself, so the digest covers every byte of the artifact.

``save`` packs a model and replaces an artifact crash-safely
(:mod:`compactnn.export.replace`). ``load`` (:mod:`compactnn.export.reader`, re-exported here)
reads every file once, checks sizes and hashes, then checks every header field and tensor
against the format (:mod:`compactnn.export.validate`) and the skeleton before it builds
anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_bytes
from torch import nn

from compactnn.core.packing import pack_codes
from compactnn.core.qembedding import QuantEmbedding, is_tied_to
from compactnn.core.qlayers import (
    QuantConv1d,
    QuantConv2d,
    conv_kwargs,
    is_quant_layer,
)
from compactnn.errors import CompactnnError, cut, name_list
from compactnn.export import folder_lock, replace, validate
from compactnn.export.fs import (
    INNER_PATH_ROOM,
    check_path_length,
    force_option,
    system_folder,
    writable_folder,
)
from compactnn.export.reader import (  # re-exported: the artifact API in one place
    artifact_digest,
    load,
    parse_tensors,
    read_artifact,
    read_header,
)
from compactnn.export.rebuild import (
    EMBEDDINGS_KEY,
    NOTES_KEY,
    QUANT_KEYS,
    SHARED_KEY,
    TIED_KEY,
)
from compactnn.export.save_checks import refuse_unsaveable, unprintable
from compactnn.export.sparse import sparsify
from compactnn.export.validate import FORMAT_VERSION, HEADER, MAX_HEADER_BYTES

# files a compactnn save writes beside the artifact's own, named by its header: the
# verification batch of a deployed model (compactnn.deployment.ship), samples of the user's
# data. A save whose header does not name one removes it (no stale user data ships).
COMPANIONS = ("deployment.safetensors",)
__all__ = ["FORMAT_VERSION", "artifact_digest", "check_writable", "load", "read_header", "save"]
__all__ = [
    "artifact_digest",
    "load",
    "parse_tensors",
    "read_artifact",
    "read_header",
    "save",
]


def info_of(model: nn.Module) -> dict[str, Any]:
    """The compression metadata ``compress`` attaches to a model (empty for a float model)."""
    return getattr(model, "_compactnn", {}) or {}


def _layer_entry(layer: nn.Module) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kind": type(layer).__name__.removeprefix("Quant"),
        "format": layer.format,
        "shape": list(layer.weight.shape),
        "weight_spec": layer.weight_spec.to_dict(),
        "act_spec": layer.input_quantizer.spec.to_dict() if layer.input_quantizer else None,
        "bias": layer.bias is not None,
    }
    if isinstance(layer, (QuantConv1d, QuantConv2d)):
        kw = conv_kwargs(layer)
        entry["conv"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    return entry


def _pack_codes(m: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """The packed codes, float16 scales and integer zero points of ``m``'s weight."""
    spec = m.weight_spec
    qt = spec.qtype
    tensors[f"{name}.weight.packed"] = pack_codes(m.weight_codes, qt)
    tensors[f"{name}.weight.scale"] = m.weight_scale.to(torch.float16)
    if not spec.symmetric:
        tensors[f"{name}.weight.zero"] = m.weight_zero.to(qt.storage_dtype)


def _pack_layer(m: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """The stored tensors of one quantized layer.

    Uniform grid: packed codes, float16 scales, integer zero points (asymmetric grids).
    Codebook: packed codes and float16 ``weight.levels`` ``(rows, ngroups, 2**bits)``, or,
    for a binary-basis grid, the float16 coefficients ``weight.basis`` ``(rows, ngroups,
    bits)`` the levels are recomputed from. A codebook stores no scale (unused; ``load``
    fills ones) and no zero point unless one is non-zero (it is the fill code of a sparse
    encoding of the codes). Input grid: ``input.qparams`` (float32 scale, zero) and, when
    non-uniform, ``input.levels`` (float16, ``2**bits``).
    """
    spec, qt = m.weight_spec, m.weight_spec.qtype
    tensors[f"{name}.weight.packed"] = pack_codes(m.weight_codes, qt)
    basis = getattr(m, "weight_basis", None)
    levels = getattr(m, "weight_levels", None)
    if levels is None:
        tensors[f"{name}.weight.scale"] = m.weight_scale.to(torch.float16)
    elif basis is not None:
        tensors[f"{name}.weight.basis"] = basis.to(torch.float16)
    else:
        tensors[f"{name}.weight.levels"] = levels.to(torch.float16)
    if not spec.symmetric and (levels is None or bool(m.weight_zero.any())):
        tensors[f"{name}.weight.zero"] = m.weight_zero.to(qt.storage_dtype)
    aq = m.input_quantizer
    if aq is not None:
        tensors[f"{name}.input.qparams"] = torch.stack([aq.scale, aq.zero]).float()
        if not aq.is_uniform:
            tensors[f"{name}.input.levels"] = aq.levels.to(torch.float16)


def pack_embeddings(
    model: nn.Module, tensors: dict[str, torch.Tensor], skip: set[str]
) -> dict[str, Any]:
    """Quantized embedding tables and the heads tied to them, as header ``extra`` entries.

    A table's codes are packed like a layer's; a head that reads a table's codes (an LM head
    tied to the embeddings) stores nothing but its bias and input grid: the codes once.
    """
    tables: dict[str, Any] = {}
    tied: dict[str, Any] = {}
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantEmbedding)]
    for name, m in found:
        _pack_codes(m, name, tensors)
        tables[name] = {
            "format": m.format,
            "shape": list(m.weight.shape),
            "weight_spec": m.weight_spec.to_dict(),
        }
        skip.update(f"{name}.{k}" for k in QUANT_KEYS)
    for head_name, head in model.named_modules():
        table = next((n for n, t in found if is_quant_layer(head) and is_tied_to(head, t)), None)
        if table is None:
            continue
        aq = head.input_quantizer
        tied[head_name] = {
            "table": table,
            "act_spec": aq.spec.to_dict() if aq is not None else None,
            "bias": head.bias is not None,
        }
        if aq is not None and not aq.is_uniform:
            raise CompactnnError(
                f"{head_name!r} reads a tied embedding table and has a non-uniform input grid, "
                "which a tied head cannot store: untie it or keep its input grid uniform."
            )
        if aq is not None:
            tensors[f"{head_name}.input.qparams"] = torch.stack([aq.scale, aq.zero]).float()
        skip.update(f"{head_name}.{k}" for k in QUANT_KEYS)
        skip.update(f"{head_name}.input_quantizer.{k}" for k in ("scale", "zero"))
    out = {}
    if tables:
        out[EMBEDDINGS_KEY] = tables
    if tied:
        out[TIED_KEY] = tied
    return out


def shared_modules(model: nn.Module) -> dict[str, str]:
    """Other name -> first name of each quantized table or layer the model holds under
    several names (T5's tied token tables: ``encoder.embed_tokens`` -> ``shared``)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name and (is_quant_layer(m) or isinstance(m, QuantEmbedding)):
            owner = first.setdefault(id(m), name)
            if owner != name:
                out[name] = owner
    return out


def pack_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """Tensors to write, per-layer header entries, and aliases of tied tensors."""
    tensors, layers, aliases, _ = pack_model(model)
    return tensors, layers, aliases


def pack_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict, dict]:
    """``pack_state`` plus the header ``extra`` entries of quantized embeddings and tied
    heads (:func:`pack_embeddings`)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    skip: set[str] = set()
    emb_extra = pack_embeddings(model, tensors, skip)
    tied = emb_extra.get(TIED_KEY, {})
    if shared := shared_modules(model):  # stored once, under the first name
        emb_extra[SHARED_KEY] = shared
        for name in shared:
            skip.update(f"{name}.{k}" for k in QUANT_KEYS)
            skip.update(f"{name}.input_quantizer.{k}" for k in ("scale", "zero", "levels"))
    for name, m in model.named_modules():
        if not is_quant_layer(m) or name in tied:
            continue
        layers[name] = _layer_entry(m)
        _pack_layer(m, name, tensors)
        skip.update(f"{name}.{k}" for k in QUANT_KEYS)
        skip.update(f"{name}.input_quantizer.{k}" for k in ("scale", "zero", "levels"))
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key in skip:
            continue
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:  # tied weights (e.g. lm_head = embeddings)
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().clone()
    return tensors, layers, aliases, emb_extra


def write_tensors(tensors: dict[str, torch.Tensor], filename: str | os.PathLike) -> None:
    """Serialise ``tensors`` as safetensors into ``filename`` (already created, empty).

    The bytes are made here and written into the file itself: safetensors' own ``save_file``
    goes through a temporary file of its own, which a killed save would leave behind.
    """
    with open(filename, "wb") as f:
        f.write(save_bytes(tensors, metadata={"format": "pt"}))


def artifact_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an artifact header (valid or not): a ``compactnn.json`` whose
    JSON carries the ``"format": "compactnn"`` marker. Other JSON (a Hugging Face folder's
    own settings file) is not one; a header that is no regular file, too big or not JSON
    counts (``load`` says what is wrong with it)."""
    header = Path(path) / HEADER
    try:
        st = os.lstat(header)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_HEADER_BYTES:
        return True
    try:
        body = json.loads(header.read_bytes())
    except (OSError, ValueError, RecursionError):
        return True
    return isinstance(body, dict) and body.get("format") == "compactnn"


def foreign_entries(folder: Path) -> list[str]:
    """Sorted names in ``folder`` that are not leftovers of a killed compactnn save."""
    return sorted(e.name for e in os.scandir(folder) if not replace.is_stray(e.name))


def check_writable(path: str | os.PathLike, force: bool, *, what: str) -> Path:
    """Refuse, before any slow work, an output path that ``save`` could not use.

    Args:
        path: the artifact directory to write.
        force: whether an existing artifact there may be replaced.
        what: how the user named ``path``, for the messages: an option (``"--out"``) is told
            to pass ``--force``, a Python argument (``"path"``) ``force=True``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CompactnnError: ``path`` is a file, under ``/proc``, ``/sys`` or ``/dev`` (but not
            ``/dev/shm``, a plain tmpfs), holds an artifact and ``force`` is false, holds
            other files (never mixed with an artifact's, even with ``force``), or is not
            writable.

    Example:
        >>> check_writable("out/cnn-w4a8", force=False, what="--out")  # doctest: +SKIP
    """
    out = Path(path)
    label = f"{what} {cut(out)!r}"
    check_path_length(out, label, room=INNER_PATH_ROOM)
    force_word = force_option(what)
    if (system := system_folder(out)) is not None:
        raise CompactnnError(
            f"{label} lies under {system}, a system folder: choose a directory of your own."
        )
    if (outer := enclosing_artifact(out)) is not None:
        rel = os.path.relpath(outer)  # as the user wrote it: 'art', not /home/...
        if not out.is_absolute() and rel != "." and not rel.startswith(".."):
            outer = Path(rel)
        raise CompactnnError(
            f"{label} lies inside {cut(str(outer))!r}, which holds a compactnn artifact: an "
            "artifact folder holds one artifact only. Choose a folder outside it, e.g. "
            f"{cut(str(outer.parent / (outer.name + '-' + out.name)))!r}."
        )
    if os.path.lexists(out):
        if not out.is_dir():
            raise CompactnnError(
                f"{label} exists and is not a directory: choose another output path or remove it."
            )
        if artifact_exists(out) and not force:
            raise CompactnnError(
                f"{label} already holds a compactnn artifact; pass {force_word} to replace it."
            )
        if not artifact_exists(out) and (others := foreign_entries(out)):
            raise CompactnnError(
                f"{label} is not empty and holds no compactnn artifact (it has "
                f"{name_list(others, 3)}): an artifact would replace or mix with those files. "
                f"Choose an empty or new folder ({force_word} only replaces an existing "
                "compactnn artifact)."
            )
    writable_folder(out.absolute(), label)
    return out


def enclosing_artifact(path: Path) -> Path | None:
    """The nearest folder above ``path`` that holds a compactnn artifact, or None.

    Example:
        >>> enclosing_artifact(Path("/")) is None
        True
    """
    for parent in Path(os.path.abspath(path)).parents:  # "out/../x" is not inside out
        if artifact_exists(parent):
            return parent
    return None


def header_body(
    model: nn.Module, layers: dict, aliases: dict, sparse_index: dict, emb_extra: dict
) -> dict:
    info = info_of(model)
    recipe = info.get("recipe")
    packed = (EMBEDDINGS_KEY, TIED_KEY, SHARED_KEY, NOTES_KEY)  # from the model and the info
    extra = {k: v for k, v in info.get("extra", {}).items() if k not in packed}
    if notes := [str(n) for n in info.get("notes", [])]:  # what compress noted, for load
        extra[NOTES_KEY] = notes
    body = {
        "format": "compactnn",
        "format_version": FORMAT_VERSION,
        "model_class": validate.model_class_name(model),
        "recipe": recipe.name if recipe is not None else None,
        "layers": layers,
        "aliases": aliases,
        "folded_bn": list(info.get("folded_bn", [])),
        "float_layers": dict(info.get("float_layers", {})),
        "extra": {**extra, **emb_extra},
        "sparse": sparse_index,
    }
    try:  # JSON values only: tuples become lists, as a reader will see them
        return json.loads(json.dumps(body, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CompactnnError(
            f"the model's compression metadata cannot be saved as JSON ({exc}): keep "
            "model._compactnn['extra'] to finite numbers, strings, lists and dicts."
        ) from exc


def _companions_named(body: dict[str, Any]) -> set[str]:
    """The :data:`COMPANIONS` a header names (a deployment record's ``example.file``)."""
    record = body["extra"].get("deployment")
    example = record.get("example") if isinstance(record, dict) else None
    name = example.get("file") if isinstance(example, dict) else None
    return {name} if name in COMPANIONS else set()


def _remove_companions(root: Path, keep: set[str]) -> None:
    """Delete the companion files of an artifact replaced by one that does not name them."""
    for name in COMPANIONS:
        file = root / name
        if name in keep or not os.path.lexists(file) or file.is_dir():
            continue
        try:
            file.unlink()
        except OSError as exc:
            raise CompactnnError(
                f"the artifact in {str(root)!r} was saved, but the previous artifact's "
                f"{name} (samples of its verification data) could not be removed ({exc}): "
                "delete it before shipping the folder."
            ) from exc


def save(model: nn.Module, path: str | os.PathLike, *, force: bool = False) -> str:
    """Write ``model`` as a packed artifact directory at ``path``; return its digest.

    Refuses to replace an existing artifact unless ``force``. The replacement is crash-safe:
    at every instant (SIGKILL, full disk, exception) the directory holds the old artifact
    or the new one, complete (see :mod:`compactnn.export.replace`).

    Args:
        model: a model returned by ``compactnn.compress`` (or any ``nn.Module``).
        path: the artifact directory (created when missing).
        force: replace an artifact already there.

    Returns:
        The artifact's SHA-256 digest (64 hex digits), which covers every file; pass it to
        ``load(..., expect_sha256=...)`` to pin this exact artifact.

    Example:
        >>> digest = compactnn.save(qmodel, "out/")  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise CompactnnError(f"save takes a torch.nn.Module, got {type(model).__name__}.")
    if (why := getattr(model, "not_saveable", None)) is not None:  # e.g. a deployed model
        raise CompactnnError(f"cannot save this model as an artifact: {why}")
    refuse_unsaveable(model)  # before anything is written
    out = check_writable(path, force, what="path")
    info = info_of(model)
    tensors, layers, aliases, emb_extra = pack_model(model)
    tensors, sparse_index = sparsify(tensors, layers, model)  # pruned zeros stored sparse
    body = header_body(model, layers, aliases, sparse_index, emb_extra)
    validate.check_printable(body, fail=unprintable)  # before anything is written
    writers = {"tensors": lambda p: write_tensors(tensors, p)}
    if (recipe := info.get("recipe")) is not None:
        text = recipe.to_yaml().encode("utf-8")
        writers["recipe"] = lambda p: Path(p).write_bytes(text)

    def make_header(files: dict) -> dict:
        header = {**body, "files": files, "digest": ""}
        header["digest"] = validate.header_digest(header)
        validate.check_header(header)  # what we write, we can read
        return header

    with removed_if_failed(out):  # a failed save leaves no folder it created
        out.mkdir(parents=True, exist_ok=True)
        digest = replace.write_artifact(out, writers, make_header, force=force)["digest"]
    # after the commit, so a failed save keeps the old artifact whole; a crash in between
    # leaves the file to the next save, which removes it the same way
    _remove_companions(out, _companions_named(body))
    return digest


def first_missing(path: str | os.PathLike) -> Path | None:
    """The outermost folder on ``path`` that does not exist yet (creating ``path`` creates
    it and everything below it), or None when ``path`` exists.

    Example:
        >>> first_missing("/tmp/no-such-folder/a/b")
        PosixPath('/tmp/no-such-folder')
    """
    path = Path(os.path.abspath(path))
    if os.path.lexists(path):
        return None
    while not os.path.lexists(path.parent):
        path = path.parent
    return path


@contextlib.contextmanager
def removed_if_failed(path: str | os.PathLike) -> Iterator[None]:
    """Run the body; if it raises (a full disk, Ctrl-C), remove the folders it made for
    ``path``: from :func:`first_missing` down, with anything written inside (all of it this
    run's). A folder that existed before is never removed, nor anything already in it."""
    top = first_missing(path)
    try:
        yield
    except folder_lock.FolderBusyError:
        raise  # the folder is another save's now: nothing in it is this run's
    except BaseException:
        if top is not None and os.path.isdir(top) and not os.path.islink(top):
            shutil.rmtree(top, ignore_errors=True)
        raise
