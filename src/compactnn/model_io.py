"""Resolve what the command line names: a model, an artifact, or calibration data.

A MODEL argument is one of:

* a reference model name (``mnist-cnn``, ``minilm``, ``tiny-lm``, ...; see
  :mod:`compactnn.models`);
* a Hugging Face model directory (holds ``config.json``);
* a ``torch.export`` archive (``.pt2``), checked first so that loading runs no code from
  it (pickled weights, native libraries and the like need ``trust_pickle=True``; see
  :mod:`compactnn.safe_pt2`);
* ``package.module:factory`` with ``--weights file.safetensors``;
* a pickled ``.pt``/``.pth`` module, only with ``trust_pickle=True`` (unpickling runs
  arbitrary code, so it is refused by default).

A ``package.module:factory`` is imported only when the user names it (command line or Python
argument); an artifact only records where it came from, as data (:func:`skeleton_for`).

Calibration data (``--data``) is a ``.safetensors`` file (one tensor, or several named tensors
given to the model as keywords), a ``.npy`` array, or a reference data set name.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn.core.modules import state_with_metadata
from compactnn.core.weight_import import lift_weight_layers, misfit_line, weights_misfit
from compactnn.data_files import cast_float as _cast
from compactnn.data_files import check_rows, read_npy, read_tensors
from compactnn.data_files import float_dtype as _float_dtype
from compactnn.data_files import is_hf_model as is_hf_model  # re-exported
from compactnn.data_files import keywords_for as _keywords_for
from compactnn.errors import CompactnnError, cut, first_line, user_stacklevel
from compactnn.export.fs import hf_weights_file
from compactnn.export.fs import sha256_file as file_sha256
from compactnn.hf_folder_errors import (
    has_safetensors_weights,
    mismatch_message,
    unknown_model_type,
    weights_refusal,
)
from compactnn.user_modules import import_hint, user_folder_importable

MODEL_FORMS = (
    "a reference model name ({refs})",
    "a Hugging Face model directory (holding config.json)",
    "a torch.export archive (file.pt2) with raw (unpickled) weights",
    "package.module:factory with --weights file.safetensors",
    "a pickled file.pt/.pth module with --trust-pickle",
)


@dataclass
class LoadedModel:
    """A float model resolved from a MODEL argument. Attributes:
    model: the float model, in eval mode.
    source: the MODEL argument (recorded in artifacts so ``eval`` can rebuild the skeleton).
    reference: the reference model object when MODEL names one, else None.
    example: one input batch (tensor, tuple or dict), when one is known.
    calib: default calibration data, when one is known.
    weights: the ``--weights`` path of a factory model.
    """

    model: nn.Module
    source: str
    reference: Any = None
    example: Any = None
    calib: Any = None
    weights: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _ReferenceModel(LoadedModel):
    """A reference model's LoadedModel: ``example`` and ``calib`` are the reference's, read
    on first use (a data-free run or one on the user's --data never reads its data set)."""

    def _from_reference(name: str) -> property:
        def get(self: LoadedModel) -> Any:
            if name in self.__dict__:
                return self.__dict__[name]
            return getattr(self.reference, name) if self.reference is not None else None

        def put(self: LoadedModel, value: Any) -> None:
            if value is not None:
                self.__dict__[name] = value

        return property(get, put)

    example = _from_reference("example")
    calib = _from_reference("calib")
    del _from_reference


def reference_names() -> list[str]:
    """Names of the reference models (empty when the models package is unavailable)."""
    try:
        from compactnn.models import REFERENCES
    except ImportError:
        return []
    return sorted(REFERENCES)


def _unknown_model(spec: str) -> CompactnnError:
    if Path(spec).is_file():  # one line: the forms that read a file (the list is for names)
        return CompactnnError(
            f"model file {spec!r} is not a MODEL form ({Path(spec).suffix or 'no suffix'}): pass "
            "package.module:factory --weights FILE.safetensors (weights need the code that "
            "builds the network), a .pt2 archive, or a .pt/.pth module with --trust-pickle."
        )
    refs = ", ".join(reference_names()) or "none installed"
    forms = "\n  ".join(f.format(refs=refs) for f in MODEL_FORMS)
    what = " (no such file, folder or reference model)" if not Path(spec).exists() else ""
    return CompactnnError(f"unknown model {spec!r}{what}. MODEL is one of:\n  {forms}")


def check_model_exists(spec: str) -> None:
    """Refuse, before anything is read or loaded, a MODEL that names nothing: a missing
    file or folder, or an unknown name (a factory ``package.module:name`` is imported only
    when loaded). Commands call it before they ask for other inputs, so that the missing
    model is named first; a compactnn artifact folder, which no command takes as its float
    MODEL, is refused here too (before ``--data`` is asked for)."""
    path = Path(spec)
    if path.is_dir() and _is_artifact(path):
        raise _folder_without_config(path)
    if spec in reference_names() or path.exists():
        return
    if ":" in spec:
        return
    if Path(spec).suffix in (".pt", ".pth", ".pt2"):
        raise CompactnnError(f"model file {spec!r} does not exist.")
    raise _unknown_model(spec)


def _is_artifact(path: Path) -> bool:
    """A compactnn artifact folder (``compactnn.json``, no Hugging Face ``config.json``)."""
    return (path / "compactnn.json").is_file() and not (path / "config.json").is_file()


def _folder_without_config(path: Path) -> CompactnnError:
    """One line for a folder without ``config.json``: a compactnn artifact (not a float
    model), or what it lacks and the MODEL form of plain weights (a factory and the file)."""
    if _is_artifact(path):
        return CompactnnError(
            f"{str(path)!r} is a compactnn artifact, not a float model: pass the model it was "
            "made from as MODEL, with a YAML recipe whose steps do both compressions in turn "
            "(docs/pruning.md, Chains), or compress the artifact itself in Python: "
            f"compactnn.compress(compactnn.load({str(path)!r}, model=<its float model>), "
            "RECIPE, calib_data=...); eval, deploy, export and report take the artifact itself."
        )
    weights = hf_weights_file(path) or next(iter(sorted(path.glob("*.safetensors"))), None)
    held = f" (it holds {weights.name})" if weights else ""
    return CompactnnError(
        f"model folder {str(path)!r} has no config.json{held}: a Hugging Face model folder "
        "needs the config.json that save_pretrained writes beside the weights; for plain "
        f"weights, pass MODEL as package.module:factory with --weights {weights or 'FILE'}."
    )


def resolve_model(
    spec: str, *, weights: str | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Load the float model a MODEL argument names.

    Example:
        >>> resolve_model("mnist-cnn").model  # doctest: +SKIP
    """
    path = Path(spec)
    if spec in reference_names():
        from compactnn.models import load_reference

        ref = load_reference(spec)
        return _ReferenceModel(ref.model.eval(), spec, ref)
    check_model_exists(spec)
    if path.suffix in (".pt", ".pth"):
        return _load_pickle(path, trust_pickle)
    if path.suffix == ".pt2":
        return _load_exported(path, trust_pickle)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_dir(path, trust_pickle)
    if path.is_dir():
        raise _folder_without_config(path)
    if ":" in spec and not path.exists():
        return _load_factory(spec, weights)
    raise _unknown_model(spec)


def _load_pickle(path: Path, trust_pickle: bool) -> LoadedModel:
    if not trust_pickle:
        raise CompactnnError(
            f"refusing to load {str(path)!r}: a .pt/.pth file is a pickle, and unpickling runs "
            "arbitrary code from the file. Pass --trust-pickle if you trust its author, or "
            "provide the model as a .pt2 torch.export archive whose weights are stored raw "
            "(not pickled), a Hugging Face directory with .safetensors weights, or "
            "package.module:factory with --weights file.safetensors."
        )
    if not path.is_file():
        raise CompactnnError(f"model file {str(path)!r} does not exist.")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, nn.Module):
        raise CompactnnError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a whole nn.Module; for a state "
            "dict use package.module:factory with --weights file.safetensors."
        )
    return LoadedModel(obj.eval(), str(path))


def _load_exported(path: Path, trust_pickle: bool) -> LoadedModel:
    from compactnn.safe_pt2 import load_exported_program

    program = load_exported_program(path, trust_pickle=trust_pickle)
    model = lift_weight_layers(program.module())
    example = None
    if getattr(program, "example_inputs", None):
        args, _kwargs = program.example_inputs
        example = args[0] if len(args) == 1 else tuple(args)
    return LoadedModel(model.eval(), str(path), example=example)


def _load_hf_dir(path: Path, trust_pickle: bool) -> LoadedModel:
    """A Hugging Face directory: no remote code ever; pickled weights only when trusted."""
    from compactnn._optional import require

    transformers = require("transformers", "hf")

    from compactnn.export.hf import hf_header, remote_code_refusal

    if refusal := remote_code_refusal(path) or weights_refusal(path, trust_pickle):
        raise refusal
    model = _hf_model(transformers, path, has_safetensors_weights(path))
    example = None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            str(path), trust_remote_code=False, local_files_only=True
        )
        sentences = ["compactnn makes networks smaller.", "A second, longer example sentence."]
        example = dict(tok(sentences, padding=True, return_tensors="pt"))
    except Exception:  # no tokenizer saved: the user passes --data
        example = None
    return LoadedModel(model.eval(), str(path), example=example, extra={"hf": hf_header(model)})


def _hf_model(transformers: Any, path: Path, safetensors: bool) -> nn.Module:
    """The float32 model of ``config.architectures``, refused when its weights do not fit."""
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        cls = _hf_class(transformers, path, getattr(config, "architectures", None))
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its load report: checked below instead
        try:
            model, info = cls.from_pretrained(
                str(path),
                trust_remote_code=False,
                use_safetensors=True if safetensors else None,
                local_files_only=True,
                output_loading_info=True,
                **{_dtype_argument(transformers): torch.float32},  # bf16/fp16 folders too
            )
        finally:
            transformers.logging.set_verbosity(verbosity)
    except CompactnnError:
        raise
    except Exception as exc:
        why = f"cannot load the Hugging Face model in {str(path)!r}: {first_line(exc, 300)}"
        why = mismatch_message(exc, path) or unknown_model_type(transformers, path) or why
        raise CompactnnError(why) from exc
    misfit = misfit_line(
        [repr(k) for k in sorted(info.get("missing_keys", ()))],
        [repr(k) for k in sorted(info.get("unexpected_keys", ()))],
        sorted(str(k) for k in info.get("mismatched_keys", ())),
    )
    if misfit:
        raise CompactnnError(
            f"the weights in {str(path)!r} do not fit its {type(model).__name__}: {misfit}; "
            "transformers would fill missing weights randomly and drop unexpected ones. Save "
            "the whole model with save_pretrained, or fix config.json's architectures."
        )
    return model


def _dtype_argument(transformers: Any) -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, before it
    ``torch_dtype``."""
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _hf_class(transformers: Any, path: Path, architectures: Any) -> type:
    """The class ``config.architectures`` names; for a name transformers does not know, the
    Auto class of its head (``...ForCausalLM`` -> ``AutoModelForCausalLM``, ``...Model`` ->
    ``AutoModel``). Never code from the folder."""
    from compactnn.export.hf import transformers_model_class

    if not architectures:
        return transformers.AutoModel
    name = str(architectures[0])
    if (cls := transformers_model_class(name)) is not None:
        return cls
    head = name[name.rfind("For") :] if "For" in name else ("" if name.endswith("Model") else name)
    auto = getattr(transformers, f"AutoModel{head}", None)
    if isinstance(auto, type) and auto.__name__.startswith("AutoModel"):
        return auto
    raise CompactnnError(
        f"{str(path / 'config.json')!r} names the architecture {name[:80]!r}, which transformers "
        "does not have (compactnn never runs code from a model folder): set config.json's "
        '"architectures" to a transformers class such as ["LlamaForCausalLM"] or one ending '
        'in "ForCausalLM", "ForMaskedLM", "ForSequenceClassification" or "Model".'
    )


def _load_factory(spec: str, weights: str | None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if not weights:
        raise CompactnnError(
            f"model {spec!r} is a factory: pass its weights with --weights file.safetensors."
        )
    if not all(part.isidentifier() for part in module_name.split(".")):
        path = Path(module_name)  # e.g. ./nets.py: a path, not a module name
        name = path.stem if path.suffix == ".py" and path.stem.isidentifier() else "MODULE"
        raise CompactnnError(
            f"model {spec!r}: name the factory's module as Python imports it, e.g. "
            f"{name}:{attr or 'FUNCTION'} (run from the folder that holds it, or add that "
            "folder to PYTHONPATH)."
        )
    with user_folder_importable():  # the module the user named, and its call, from their folder
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            stem = module_name.removesuffix(".py")
            fix = f"{stem}:{attr or 'FUNCTION'}"
            named = stem != module_name
            hint = f" (a file name: write {fix})" if named else import_hint(exc, module_name)
            raise CompactnnError(f"cannot import factory {spec!r}: {exc}{hint}") from exc
        try:  # the factory may import its siblings by a computed name (importlib.import_module)
            model = factory()
        except ImportError as exc:
            raise CompactnnError(
                f"factory {spec!r} failed to import a module while building the model ({exc}): "
                "install it, or run from the folder that holds it."
            ) from exc
    if not isinstance(model, nn.Module):
        raise CompactnnError(f"factory {spec!r} returned a {type(model).__name__}, not a Module.")
    tensors = read_tensors(weights)
    misfit = weights_misfit(model.state_dict(), tensors)
    if misfit:
        raise CompactnnError(
            f"the weights in {weights!r} do not fit the model {spec!r} builds: {misfit}; pass "
            "the weights saved from this factory's model (save_file(model.state_dict(), ...))."
        )
    try:  # with the model's module versions: safetensors stores none (MNASNet needs them)
        model.load_state_dict(state_with_metadata(model, tensors), strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied: its first line only
        first = first_line(exc, 300)
        raise CompactnnError(
            f"the weights in {weights!r} do not fit the model {spec!r} builds: {first}"
        ) from exc
    except Exception as exc:  # the model's own loading code (_load_from_state_dict) refused
        first = first_line(exc, 300)
        raise CompactnnError(
            f"the model {spec!r} builds refused the weights in {weights!r} while loading them "
            f"({type(exc).__name__}: {first}); pass the weights saved from this factory's "
            "model (save_file(model.state_dict(), ...))."
        ) from exc
    return LoadedModel(model.eval(), spec, weights=str(weights))


def resolve_data(spec: str | None, loaded: LoadedModel | None = None) -> Any:
    """Calibration/evaluation inputs named by ``--data`` (None: the model's default data).

    Returns a tensor, a dict of tensors (passed to the model as keywords, or ``x``/``y``
    inputs and labels), or whatever a reference model uses as calibration data. Floating-point
    tensors from a file are cast to the model's dtype (float32 unless the model says
    otherwise: numpy's default float64 would not run); integer tensors are kept as they are.
    """
    if spec is None:
        return loaded.calib if loaded is not None else None
    path = Path(spec)
    dtype = _float_dtype(loaded.model if loaded is not None else None)
    model = loaded.model if loaded is not None else None
    if path.suffix == ".safetensors":
        tensors = {k: _cast(v, dtype) for k, v in read_tensors(path).items()}
        if len(tensors) == 1:
            (name, tensor), *_ = tensors.items()
            return _keywords_for(model, tensor, name, spec)
        check_rows(spec, tensors)
        return tensors
    if path.suffix == ".npy":
        array = read_npy(spec)
        try:
            tensor = _cast(torch.from_numpy(array), dtype)
        except TypeError as exc:  # object/string/complex arrays torch has no dtype for
            raise CompactnnError(
                f"{spec!r} holds {array.dtype} values; save numeric inputs (float or integer)."
            ) from exc
        return _keywords_for(model, tensor, spec=spec)
    if spec in reference_names():
        from compactnn.models import load_reference

        return load_reference(spec).calib
    if path.suffix in (".pt", ".pth", ".pkl", ".pickle"):
        raise CompactnnError(
            f"data {spec!r} is a pickle; save inputs as .safetensors or .npy instead."
        )
    names = ", ".join(reference_names()) or "none"
    raise CompactnnError(
        f"unknown data {spec!r}: pass a .safetensors or .npy file of inputs, or a reference "
        f"model's name ({names}: its calibration batches)."
    )


def skeleton_for(
    header: dict[str, Any],
    model_spec: str | None = None,
    *,
    weights: str | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """The float model an artifact was made from.

    The artifact's record of its source is data, never code or a file to open: only a
    reference model name (one of :func:`reference_names`) is loaded from it. Any other source
    (a factory, a ``.pt2``/``.pt`` file, a Hugging Face directory) must be given again by
    the caller as ``model_spec`` (with ``weights``); a ``weights`` file whose SHA-256 differs
    from the recorded one gets a warning. Trust in pickles is never read from the artifact.

    Example:
        >>> skeleton_for(read_header("out/a"), "pkg.mod:make", weights="w.safetensors")
        ... # doctest: +SKIP
    """
    source = header.get("extra", {}).get("source", {})
    source = source if isinstance(source, dict) else {}
    if model_spec:
        loaded = resolve_model(model_spec, weights=weights, trust_pickle=trust_pickle)
        _warn_if_changed(loaded, source)
        return loaded
    kind = source.get("kind", "reference")  # records without a kind named a model
    if not isinstance(kind, str) or kind not in SOURCE_KINDS:  # never read as another kind
        raise CompactnnError(
            f"this artifact records its float model as a {cut(repr(kind), 40)}, a kind this "
            "compactnn does not know (from a newer compactnn?): upgrade compactnn, or pass "
            "the float model again: --model MODEL."
        )
    spec = source.get("model")
    if kind == "reference" and isinstance(spec, str) and spec in reference_names():
        return resolve_model(spec)
    raise CompactnnError(describe_source(source))


SOURCE_KINDS = ("reference", "factory", "Hugging Face directory", "torch.export archive")
SOURCE_KINDS += ("pickled module",)  # extra.source.kind as commands._common.source_record writes


def describe_source(source: dict[str, Any]) -> str:
    """One line: what the artifact was made from, and what to pass to rebuild it."""
    spec = source.get("model")
    if not spec:
        return "this artifact does not record which model it came from: pass --model MODEL."
    kind = source.get("kind", "model")
    digest = source.get("weights_sha256") or source.get("sha256")
    made = f"this artifact was made from the {cut(kind, 40)} {cut(spec)!r}"  # values from a file
    if source.get("weights"):
        made += f" with weights {cut(source['weights'])!r}"
    if digest:
        made += f" (SHA-256 {str(digest)[:16]}...)"
    how = (
        f"--model {cut(spec)} --weights FILE.safetensors"
        if kind == "factory"
        else "--model MODEL (the same file or directory, or a factory with --weights)"
    )
    return (
        f"{made}; an artifact never names code or files to load, so pass the float model "
        f"again: {how}."
    )


def _warn_if_changed(loaded: LoadedModel, source: dict[str, Any]) -> None:
    """Warn (not fail) when the given weights are not the ones the artifact was made from."""
    recorded = source.get("weights_sha256") or source.get("sha256")
    path = loaded.weights or (loaded.source if loaded.reference is None else None)
    if not recorded or not path:
        return
    file = Path(path)
    file = hf_weights_file(file) if file.is_dir() else file
    if file is None or not file.is_file():
        return
    actual = file_sha256(file)
    if actual != recorded:
        warnings.warn(
            f"{str(file)!r} (SHA-256 {actual[:16]}...) is not the file this artifact was made "
            f"from (SHA-256 {str(recorded)[:16]}...); results may differ from the original.",
            stacklevel=user_stacklevel(),
        )
