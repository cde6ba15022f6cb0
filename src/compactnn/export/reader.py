"""Reading artifacts back: verify every file, then rebuild the model (``load``).

``read_artifact`` reads each file of an artifact once and checks sizes, SHA-256 hashes and
the one digest over the header; ``load`` then checks every header field and tensor against
the format (:mod:`compactnn.export.validate`) and the skeleton before it builds anything
(:mod:`compactnn.export.rebuild`), optionally straight onto kernel layers
(:mod:`compactnn.kernels.load`). Writing is :mod:`compactnn.export.artifact`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from torch import nn

from compactnn.core.model_input import unwrap_model, working_copy
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export import folder_lock, validate
from compactnn.export.ctensors import install_save_pretrained
from compactnn.export.fs import read_regular
from compactnn.export.rebuild import NOTES_KEY, build_model, header_notes
from compactnn.export.sparse import densify
from compactnn.export.validate import HEADER, MAX_HEADER_BYTES, TENSORS
from compactnn.kernels.load import install_kernels, kernel_config, meta_copy, params_on_meta


def read_artifact(
    path: str | os.PathLike, expect_sha256: str | None = None
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The verified header and the bytes of each listed file (``{"tensors", "recipe"}``).

    A save in progress in the folder is waited for (:func:`folder_lock.shared`); a read that
    fails while a save has started meanwhile is read again once that save has finished, so a
    load racing a ``--force`` save returns the old or the new artifact, never an error.

    Raises:
        ArtifactError: anything is missing, special, truncated, modified, malformed, or the
            digest differs from ``expect_sha256``.
    """
    root = Path(path)
    with folder_lock.shared(root):
        try:
            return _read_once(path, expect_sha256)
        except ArtifactError:
            if not folder_lock.lock_file_exists(root):
                raise
    with folder_lock.shared(root):  # a save replaced files under the first read
        return _read_once(path, expect_sha256)


def _read_once(
    path: str | os.PathLike, expect_sha256: str | None
) -> tuple[dict[str, Any], dict[str, bytes]]:
    if not str(path).strip():
        raise ArtifactError(
            "the artifact path is empty: pass the artifact folder, e.g. "
            "compactnn.load('out/model-w8')."
        )
    root = Path(path)
    want = _pinned(expect_sha256)
    if not root.is_dir():
        raise ArtifactError(f"{str(root)!r} is not a directory holding a compactnn artifact.")
    hp = root / HEADER
    if not os.path.lexists(hp):
        raise ArtifactError(
            f"{str(root)!r} holds no compactnn artifact ({HEADER} is missing; an interrupted "
            "first save leaves none)."
        )
    header = validate.parse_header(read_regular(hp, None, MAX_HEADER_BYTES), str(hp))
    validate.check_version(header, str(hp))
    digest = validate.header_digest(header)
    if digest != header.get("digest"):
        raise ArtifactError(
            f"{hp} was modified after saving: its digest does not match its content; re-save "
            "the artifact."
        )
    validate.check_header(header)  # rules that hold even for a header edited and re-hashed
    if want is not None and digest != want:
        raise ArtifactError(
            f"artifact {str(root)!r} has digest {digest}, not the pinned {want}: it is "
            "another artifact or was changed."
        )
    blobs = {}
    for role, f in header["files"].items():
        fp = root / f["name"]
        data = read_regular(fp, f["bytes"])
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise ArtifactError(f"{fp} was modified after saving: its SHA-256 does not match.")
        blobs[role] = data
    return header, blobs


def _pinned(expect: Any) -> str | None:
    if expect is None:
        return None
    if not isinstance(expect, str) or not validate.is_hex64(expect.strip().lower()):
        raise CompactnnError(
            f"expect_sha256={expect!r:.80} is not a digest: pass the 64 hex digits that "
            "compactnn.save or artifact_digest returned."
        )
    return expect.strip().lower()


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify an artifact (header and every file); raise ``ArtifactError`` if bad."""
    return read_artifact(path)[0]


def artifact_digest(path: str | os.PathLike) -> str:
    """The SHA-256 digest of a verified artifact, covering every file.

    It detects corruption and accidental edits; it does not stop someone who edits the
    artifact and recomputes the digest. Pin a digest you obtained from a trusted source.

    Example:
        >>> artifact_digest("out/cnn-w4a8")  # doctest: +SKIP
        '3f0c...'
    """
    return read_artifact(path)[0]["digest"]


@contextlib.contextmanager
def _malformed(root: Path) -> Iterator[None]:
    """Turn any failure while building from a verified header into an ``ArtifactError``."""
    try:
        yield
    except CompactnnError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise ArtifactError(
            f"artifact {str(root)!r} does not fit the given model skeleton or is malformed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def parse_tensors(data: bytes, root: Path) -> dict[str, torch.Tensor]:
    """The tensors of an artifact's ``model.safetensors`` bytes (``ArtifactError`` if bad)."""
    try:
        return load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OSError) as exc:
        raise ArtifactError(f"{root / TENSORS} cannot be read: {exc}") from exc


def _parse_recipe(data: bytes | None, header: dict[str, Any], root: Path) -> Any:
    if data is None:
        return None
    from compactnn.recipe import Recipe
    from compactnn.registry import UnknownMethodError

    try:
        recipe = Recipe.from_yaml(
            data.decode("utf-8"), f"recipe file {str(root / 'recipe.yaml')!r}"
        )
    except UnknownMethodError as exc:  # a valid artifact of a method this process lacks
        raise ArtifactError(
            f"the artifact was made with method {exc.name!r}, which is not registered: "
            "import the module that registers it (the plugin) before compactnn.load, or "
            "--plugin MODULE on the command line."
        ) from exc
    except (
        CompactnnError,
        UnicodeDecodeError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        RecursionError,
    ) as exc:
        raise ArtifactError(f"the artifact's recipe file is not a valid recipe: {exc}") from exc
    if recipe.name != header["recipe"]:
        raise ArtifactError(
            f"the artifact's recipe is named {recipe.name!r} but its header says "
            f"{header['recipe']!r}; re-save the artifact."
        )
    return recipe


def _check_model_arg(model: Any) -> None:
    """Refuse, before any file is read, a ``model=`` that is no skeleton instance."""
    if model is None or isinstance(model, nn.Module):
        return
    if isinstance(model, type) and issubclass(model, nn.Module):
        name = model.__name__[:80]
        raise CompactnnError(
            f"model= takes an instance, got the class {name}: pass model={name}(), built "
            "as for training (load fills in its weights from the artifact)."
        )
    if isinstance(model, dict):
        raise CompactnnError(
            "model= got a dict (a state dict?): pass the float model itself, built as for "
            "training, e.g. model=MyNet() (load fills in its weights from the artifact)."
        )
    raise CompactnnError(
        f"model= must be a torch.nn.Module, got {type(model).__name__}: pass the float model "
        "the artifact was made from, e.g. model=MyNet()."
    )


def class_fits(saved: str, model: nn.Module) -> bool:
    """Whether a skeleton's class may take an artifact that names class ``saved``.

    Its class or a base class (other than ``nn.Module``) must be ``saved``: by module and
    qualified name, or by qualified name alone when the module differs (a class defined in
    the saving script, ``__main__.Net``, imported from a module where it is loaded, or a
    module renamed since). The names are compared as text: nothing the artifact names is
    imported. Layer names, shapes and dtypes are checked tensor by tensor afterwards.

    Example:
        >>> class Net(nn.Module): pass
        >>> class_fits("__main__.Net", Net()), class_fits("__main__.Other", Net())
        (True, False)
    """
    for cls in type(model).__mro__:
        if cls is nn.Module:
            break
        if saved == f"{cls.__module__}.{cls.__qualname__}" or saved.endswith(
            f".{cls.__qualname__}"
        ):
            return True
    return False


def _skeleton(
    root: Path, header: dict[str, Any], model: nn.Module | None, strict_class: bool
) -> nn.Module:
    if model is None:
        from compactnn.export.hf import skeleton_from_header

        model = skeleton_from_header(root, header)
    else:  # torch.compile / DataParallel skeletons: the model inside; legacy weight norms folded
        model = working_copy(unwrap_model(model, "loading onto"))
    if strict_class and not class_fits(header["model_class"], model):
        raise ArtifactError(
            f"artifact {str(root)!r} holds a {header['model_class']!r}, but the skeleton is a "
            f"{validate.model_class_name(model)!r}: pass the float model it was made from, "
            "or strict_class=False to load onto this class (its layers and tensors must "
            "still match the artifact's)."
        )
    return model.eval()


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    expect_sha256: str | None = None,
    kernels: Any = False,
    strict_class: bool = True,
) -> nn.Module:
    """Rebuild a compressed model from an artifact; ``model`` is the float skeleton.

    Every file is read once and checked (size, SHA-256, one digest over all of them), then
    every header field and tensor is checked against the format and the skeleton, before
    anything is built. The skeleton is copied, never changed. Outputs are bit-identical to
    the model that was saved.

    Args:
        path: the artifact directory.
        model: the float model the artifact was made from, an instance (its class and layer
            shapes must match; a class of the same name from another module, e.g. the
            saving script's ``__main__.Net``, or a subclass fits); optional for Hugging Face
            models, whose architecture is saved.
        expect_sha256: the digest ``save`` returned; the artifact must have exactly it.
        kernels: ``True`` or a ``KernelConfig``: build the model straight on kernel layers,
            bit-identical to ``to_kernels(load(path))`` with that config, without ever
            holding the float32 weights (:mod:`compactnn.kernels.load`).
        strict_class: ``False`` loads onto a skeleton of another class (:func:`class_fits`
            refuses it) whose layer names, shapes and dtypes match the artifact's.

    Raises:
        ArtifactError: the artifact is missing, damaged, edited, of an older format, has
            another digest than ``expect_sha256``, or does not fit the skeleton.

    Example:
        >>> qmodel = compactnn.load("out/", model=MyNet())  # doctest: +SKIP
    """
    _check_model_arg(model)
    if not isinstance(strict_class, bool):
        raise CompactnnError(
            f"strict_class={strict_class!r:.40} is not a bool: pass True (the default) or False."
        )
    root = Path(path)
    config = kernel_config(kernels)
    header, blobs = read_artifact(root, expect_sha256)
    tensors = parse_tensors(blobs.pop("tensors"), root)
    recipe = _parse_recipe(blobs.get("recipe"), header, root)
    with _malformed(root), params_on_meta() if config else contextlib.nullcontext():
        if config is not None and isinstance(model, nn.Module):
            model = meta_copy(model)  # float weights come from the artifact, not the skeleton
        model = _skeleton(root, header, model, strict_class)
        with warnings.catch_warnings():  # copying into a meta parameter: filled below
            warnings.filterwarnings("ignore", message=".*meta parameter.*")
            build_model(model, header, tensors)
    model._compactnn = {
        "recipe": recipe,
        "folded_bn": header["folded_bn"],
        "float_layers": header["float_layers"],
        "notes": header_notes(header["extra"]),
        "extra": {k: v for k, v in header["extra"].items() if k != NOTES_KEY},
    }
    if config is not None:
        state = densify(tensors, header["sparse"], header["layers"])
        state.update({k: state[t] for k, t in header["aliases"].items() if t in state})
        with _malformed(root):
            install_kernels(model, state, config)
    # in eval mode as compress() returns it: the quantized layers, quantizers and token
    # tables build_model / install_kernels made start in training mode
    model.eval()
    model._compactnn.update(  # the keys compress sets, as a load knows them
        measured={},  # nothing measured: compress's peak memory is not saved
        float_classes=frozenset(type(m) for m in model.modules()),  # all rebuilt by load
        made_by={},  # no method's handler put a class in: load built each module
    )
    return install_save_pretrained(model)  # HF models: save_pretrained writes the codes
