"""Shipping a deployed model: ``save_deployed`` / ``load_deployed``.

A deployed model holds compiled kernels, which are not portable; what ships is what rebuilds
them. ``save_deployed`` writes the simulated source model as a normal packed artifact (the
low-bit codes stay packed) whose header ``extra`` mapping carries a ``"deployment"`` record:
the backend, the deploy settings, the verification result, and the size and SHA-256 of
``deployment.safetensors``, a second file in the artifact directory holding the verification
batch (at most :data:`MAX_SAMPLES` samples). The artifact's digest covers the header, so it
covers that file's hash too. ``load_deployed`` loads the artifact, checks the file against
the recorded hash, deploys on the recorded backend, and verifies again on the stored batch:
a model that does not reproduce its simulation on *this* machine is refused.

``save`` and ``load`` here dispatch: a deployed model or artifact goes through the functions
above, anything else through :mod:`compactnn.export.artifact` (the package facade can
re-export them as ``compactnn.save`` / ``compactnn.load``).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import fx, nn

from compactnn.deployment.api import BACKENDS, DeployedModel, deploy
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export import artifact
from compactnn.export.artifact import info_of
from compactnn.export.fs import atomic_write, read_regular
from compactnn.export.validate import HEADER, MAX_HEADER_BYTES, is_hex64, parse_header
from compactnn.lowering.plan import RESIDUALS

KEY = "deployment"  # the record's key in the artifact header's ``extra`` mapping
EXAMPLE_FILE = "deployment.safetensors"
MAX_SAMPLES = 8  # samples of the verification batch stored with the artifact
MAX_EXAMPLE_BYTES = 256 << 20
RECORD_VERSION = 1
_LAYOUTS = ("tensor", "tuple", "dict")


def save_deployed(
    deployed: DeployedModel,
    path: str | os.PathLike,
    *,
    example: Any = None,
    force: bool = False,
) -> str:
    """Write ``deployed`` as an artifact that :func:`load_deployed` re-deploys and re-verifies.

    Args:
        deployed: a model returned by ``compactnn.deploy``.
        path: the artifact directory (created when missing).
        example: the verification batch to store; default the one ``deploy`` verified on.
            Only its first :data:`MAX_SAMPLES` samples are kept.
        force: replace an artifact already there.

    Returns:
        The artifact's SHA-256 digest (covers every file, the stored batch included).

    Example:
        >>> fast = compactnn.deploy(qmodel, example=images[:8])   # doctest: +SKIP
        >>> save_deployed(fast, "out/cnn-int8")                   # doctest: +SKIP
        >>> fast2 = load_deployed("out/cnn-int8", model=MyNet())  # doctest: +SKIP
    """
    if not isinstance(deployed, DeployedModel):
        raise CompactnnError(
            f"save_deployed takes the model compactnn.deploy returned, got "
            f"{type(deployed).__name__}; save a compressed model with compactnn.save."
        )
    source = deployed.source
    if source is None or deployed.verification is None:
        raise CompactnnError("this DeployedModel was not made by compactnn.deploy: deploy again.")
    if isinstance(source, fx.GraphModule):
        raise CompactnnError(
            "a model from quantize_residuals is a torch.fx graph, which an artifact cannot "
            "rebuild: save the compressed model (compactnn.save(qmodel, path)) and call "
            "quantize_residuals and deploy again after loading it."
        )
    tensors, layout, keys = _pack_example(deployed.example if example is None else example)
    data = save_bytes(tensors, metadata={"format": "pt"})
    record = {
        "version": RECORD_VERSION,
        "backend": deployed.backend,
        "residual": deployed.settings.get("residual", "exact"),
        "tolerance": float(deployed.settings.get("tolerance", deployed.verification.tolerance)),
        "unsupported": deployed.settings.get("unsupported", "float"),
        "verification": str(deployed.verification),
        "example": {
            "file": EXAMPLE_FILE,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "layout": layout,
            "keys": keys,
        },
    }
    shell = _with_record(source, record)
    digest = artifact.save(shell, path, force=force)
    # after the artifact: a crash in between leaves an artifact whose record names a file
    # that is missing, which load_deployed refuses by name (compactnn.load still reads it)
    atomic_write(Path(path) / EXAMPLE_FILE, lambda tmp: Path(tmp).write_bytes(data))
    return digest


def load_deployed(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    expect_sha256: str | None = None,
    strict_class: bool = True,
) -> DeployedModel:
    """Rebuild a deployed model saved by :func:`save_deployed`, verified on this machine.

    Args:
        path: the artifact directory.
        model: the float skeleton, as for ``compactnn.load`` (optional for Hugging Face).
        expect_sha256: the digest ``save_deployed`` returned; the artifact must have it.
        strict_class: as for ``compactnn.load``.

    Returns:
        A :class:`DeployedModel` on the recorded backend, verified on the stored batch.

    Raises:
        ArtifactError: the artifact or its stored batch is missing, damaged or edited.
        CompactnnError: the recorded backend is unavailable here (e.g. onnxruntime not
            installed), or the integer model does not reproduce the simulated one here.

    Example:
        >>> fast = load_deployed("out/cnn-int8", model=MyNet())  # doctest: +SKIP
    """
    root = Path(path)
    qmodel = artifact.load(root, model, expect_sha256=expect_sha256, strict_class=strict_class)
    extra = dict(info_of(qmodel).get("extra", {}))
    if KEY not in extra:
        raise CompactnnError(
            f"{str(root)!r} holds a compressed model, not a deployed one: load it with "
            "compactnn.load and call compactnn.deploy."
        )
    record = _check_record(extra.pop(KEY))
    qmodel._compactnn["extra"] = extra  # the loaded source is a plain compressed model
    example = _read_example(root, record["example"])
    try:
        return deploy(
            qmodel,
            record["backend"],
            example=example,
            tolerance=record["tolerance"],
            residual=record["residual"],
            unsupported=record["unsupported"],
        )
    except CompactnnError as e:
        raise CompactnnError(
            f"the deployed model in {str(root)!r} (saved as: {record['verification']}) cannot "
            f"be rebuilt on this machine: {e}"
        ) from e


def is_deployed_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an artifact with a deployment record (header only, unverified)."""
    try:
        header = parse_header(read_regular(Path(path) / HEADER, None, MAX_HEADER_BYTES), HEADER)
    except (ArtifactError, OSError):
        return False
    extra = header.get("extra")
    return isinstance(extra, dict) and KEY in extra


def save(model: nn.Module, path: str | os.PathLike, *, force: bool = False) -> str:
    """``compactnn.save``: a deployed model through :func:`save_deployed`, else an artifact.

    Example:
        >>> save(compactnn.deploy(qmodel, example=x), "out/int8")  # doctest: +SKIP
    """
    if isinstance(model, DeployedModel):
        return save_deployed(model, path, force=force)
    return artifact.save(model, path, force=force)


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    expect_sha256: str | None = None,
    kernels: Any = False,
    strict_class: bool = True,
) -> nn.Module:
    """``compactnn.load``: a deployed artifact through :func:`load_deployed`, else the model.

    ``kernels=True`` (or a ``KernelConfig``) builds a compressed transformer straight on the
    kernel layers of :func:`compactnn.to_kernels`, without a float copy of its weights.
    ``strict_class=False`` loads onto a skeleton of another class whose layers and tensors
    match the artifact's (the same class from another module always fits).

    Example:
        >>> fast = load("out/int8", model=MyNet())  # doctest: +SKIP
    """
    if is_deployed_artifact(path):
        if kernels is not False:
            raise CompactnnError(
                "kernels= applies to compressed artifacts; a deployed artifact runs on its "
                "recorded backend: load it without kernels=."
            )
        return load_deployed(path, model, expect_sha256=expect_sha256, strict_class=strict_class)
    return artifact.load(
        path, model, expect_sha256=expect_sha256, kernels=kernels, strict_class=strict_class
    )


def _with_record(source: nn.Module, record: dict[str, Any]) -> nn.Module:
    """A shallow copy of ``source`` whose compression metadata carries ``record``."""
    info = info_of(source)
    shell = object.__new__(type(source))
    shell.__dict__.update(source.__dict__)  # same modules and tensors, own metadata
    shell.__dict__["_compactnn"] = {**info, "extra": {**info.get("extra", {}), KEY: record}}
    return shell


def _head(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        raise CompactnnError(
            f"save_deployed stores the verification batch as tensors: {what} is "
            f"{type(t).__name__}; pass example= a tensor, or a tuple or dict of tensors."
        )
    return t[:MAX_SAMPLES].detach().cpu().contiguous().clone()


def _pack_example(example: Any) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The first samples of ``example`` as named tensors, its layout and its key order."""
    if isinstance(example, torch.Tensor):
        return {"x": _head(example, "example")}, "tensor", ["x"]
    if isinstance(example, (tuple, list)) and example:
        keys = [str(i) for i in range(len(example))]
        return (
            {k: _head(t, f"example[{k}]") for k, t in zip(keys, example, strict=True)},
            ("tuple"),
            keys,
        )
    if isinstance(example, dict) and example:
        keys = [str(k) for k in example]
        return {k: _head(example[k], f"example[{k!r}]") for k in keys}, "dict", keys
    raise CompactnnError(
        "save_deployed needs the verification batch (a tensor, tuple or dict of tensors): "
        "pass example=."
    )


def _check_record(record: Any) -> dict[str, Any]:
    """The deployment record of an untrusted header, every field checked."""

    def bad(field: str, problem: str) -> ArtifactError:
        return ArtifactError(
            f"artifact field extra.{KEY}.{field} {problem}; the artifact is damaged or was "
            "edited: save the deployed model again with save_deployed (`compactnn deploy "
            "ARTIFACT --save DIR` from the compressed artifact it came from)."
        )

    if not isinstance(record, dict):
        raise bad("", "must be an object")
    version = record.get("version")
    if type(version) is int and version > RECORD_VERSION:
        raise ArtifactError(
            f"artifact field extra.{KEY}.version is {version}: written by a newer compactnn "
            f"(deployment record version {version}; this one reads {RECORD_VERSION}): upgrade "
            "compactnn, or deploy the compressed artifact it came from again with this one: "
            "compactnn deploy ARTIFACT --save DIR."
        )
    if type(version) is not int or version != RECORD_VERSION:
        raise bad("version", f"is {version!r:.40}, this compactnn reads {RECORD_VERSION}")
    if record.get("backend") not in BACKENDS[1:]:
        raise bad("backend", f"must be one of {BACKENDS[1:]}")
    if record.get("residual") not in RESIDUALS:
        raise bad("residual", f"must be one of {RESIDUALS}")
    if record.get("unsupported") not in ("float", "error"):
        raise bad("unsupported", "must be 'float' or 'error'")
    tol = record.get("tolerance")
    if type(tol) not in (int, float) or not math.isfinite(tol) or tol < 0:
        raise bad("tolerance", "must be a finite number >= 0")
    if not isinstance(record.get("verification"), str):
        raise bad("verification", "must be a string")
    ex = record.get("example")
    if not isinstance(ex, dict) or ex.get("file") != EXAMPLE_FILE:
        raise bad("example", f"must describe the file {EXAMPLE_FILE!r}")
    size = ex.get("bytes")
    if type(size) is not int or not 0 < size <= MAX_EXAMPLE_BYTES:
        raise bad("example.bytes", f"must be an integer in (0, {MAX_EXAMPLE_BYTES}]")
    if not is_hex64(ex.get("sha256")):
        raise bad("example.sha256", "is not 64 lowercase hex digits")
    keys = ex.get("keys")
    if ex.get("layout") not in _LAYOUTS:
        raise bad("example.layout", f"must be one of {_LAYOUTS}")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise bad("example.keys", "must be a non-empty list of strings")
    if len(set(keys)) != len(keys) or (ex["layout"] == "tensor" and keys != ["x"]):
        raise bad("example.keys", "must be distinct (['x'] for a tensor)")
    return record


def _read_example(root: Path, ex: dict[str, Any]) -> Any:
    """The stored verification batch, checked against the hash the verified header holds."""
    where = root / EXAMPLE_FILE
    if not os.path.lexists(where):
        raise ArtifactError(
            f"{where} is missing: the deployed model's verification batch was not saved "
            "(an interrupted save_deployed?); save the deployed model again."
        )
    data = read_regular(where, ex["bytes"])
    if hashlib.sha256(data).hexdigest() != ex["sha256"]:
        raise ArtifactError(f"{where} was modified after saving: its SHA-256 does not match.")
    try:
        tensors = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OSError) as e:
        raise ArtifactError(f"{where} cannot be read: {e}") from e
    if sorted(tensors) != sorted(ex["keys"]):
        raise ArtifactError(f"{where} holds {sorted(tensors)}, the record lists {ex['keys']}.")
    if ex["layout"] == "tensor":
        return tensors["x"]
    if ex["layout"] == "tuple":
        return tuple(tensors[k] for k in ex["keys"])
    return {k: tensors[k] for k in ex["keys"]}
