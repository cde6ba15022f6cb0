"""Rebuilding a model skeleton from what an artifact records, when no skeleton is given."""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn.core.seeding import forked_rng
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export.user_files import read_regular_bytes


def hf_header(model: nn.Module) -> dict[str, Any] | None:
    """``{"class", "config"}`` that rebuilds a Hugging Face model's architecture, else None.

    Recorded by ``compress`` in ``model._compactnn["extra"]["hf"]`` so that
    ``compactnn.load(dir)`` needs no float model.
    """
    config = getattr(model, "config", None)
    if (
        config is None
        or not hasattr(config, "to_dict")
        or "transformers" not in str(type(model).__mro__)
    ):
        return None
    return {"class": type(model).__name__, "config": config.to_dict()}


# Architectures an artifact header may name (the class is also looked up in ``transformers``
# itself and must subclass ``PreTrainedModel``). The header is not trusted: this list, not
# the file, decides which model code runs when ``load(path)`` rebuilds a skeleton. It stays a
# list of text families rather than "whatever AutoModelForSeq2SeqLM / config.architectures
# maps to": those mappings also hold EncoderDecoderModel (whose sub-configs name any model
# type, backbones that load weights at build time included) and audio / multimodal models.
_FAMILIES = {
    "Bert": ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification"),
    "DistilBert": ("Model", "ForMaskedLM", "ForSequenceClassification"),
    "Roberta": ("Model", "ForMaskedLM", "ForSequenceClassification"),
    "XLMRoberta": ("Model", "ForMaskedLM", "ForSequenceClassification"),
    "MPNet": ("Model", "ForMaskedLM"),
    "Electra": ("Model",),
    "Llama": ("Model", "ForCausalLM", "ForSequenceClassification"),
    "Mistral": ("Model", "ForCausalLM"),
    "Mixtral": ("Model", "ForCausalLM"),
    "Qwen2": ("Model", "ForCausalLM"),
    "Qwen3": ("Model", "ForCausalLM"),
    "Gemma": ("Model", "ForCausalLM"),
    "Gemma2": ("Model", "ForCausalLM"),
    "Phi": ("Model", "ForCausalLM"),
    "Phi3": ("Model", "ForCausalLM"),
    "OPT": ("Model", "ForCausalLM"),
    "GPT2": ("Model", "LMHeadModel"),
    "GPTNeoX": ("Model", "ForCausalLM"),
    "Falcon": ("Model", "ForCausalLM"),
    "StableLm": ("Model", "ForCausalLM"),
    "ViT": ("Model", "ForImageClassification"),
    # encoder-decoder text models: token tables shared by encoder, decoder and LM head
    "T5": ("Model", "EncoderModel", "ForConditionalGeneration"),
    "MT5": ("Model", "EncoderModel", "ForConditionalGeneration"),
    "UMT5": ("Model", "EncoderModel", "ForConditionalGeneration"),
    "Bart": ("Model", "ForConditionalGeneration"),
    "MBart": ("Model", "ForConditionalGeneration"),
    "Marian": ("Model", "MTModel"),
}
HF_ARCHITECTURES = frozenset(f + suffix for f, suffixes in _FAMILIES.items() for suffix in suffixes)


def transformers_model_class(name: Any) -> type | None:
    """The ``transformers`` model class called ``name``, or None when ``transformers`` has no
    ``PreTrainedModel`` subclass of that name (a function, a module, a config class...)."""
    from compactnn._optional import require

    transformers = require("transformers", "hf")

    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return None


def _code_files(auto_map: Any) -> str:
    """The folder's code files ``auto_map`` names (``{"AutoModel": "modeling_x.XModel"}`` ->
    ``modeling_x.py``; ``"repo--module.Class"`` names code in another repository)."""
    refs = [
        v for value in auto_map.values() for v in (value if isinstance(value, list) else [value])
    ]
    files = sorted({str(r).split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs if r})
    return ", ".join(files[:3]) + (", ..." if len(files) > 3 else "") or "auto_map"


def _known_type(config: dict[str, Any]) -> bool:
    """Whether ``config``'s ``model_type`` is one the installed transformers has."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


# auto_map entries for classes that never touch the model's weights (compactnn compresses the
# model; it loads no tokenizer or processor from the folder)
PREPROCESSING_AUTO = ("AutoTokenizer", "AutoProcessor", "AutoImageProcessor")
PREPROCESSING_AUTO += ("AutoFeatureExtractor",)


def _mistyped_field(config: dict) -> str | None:
    """What is wrong with a config's ``architectures`` / ``model_type`` type, else None
    (transformers failed on them with "'int' object is not subscriptable").

    Example:
        >>> _mistyped_field({"architectures": 5})
        'architectures is 5, not a list of class names (e.g. ["LlamaForCausalLM"])'
    """
    archs = config.get("architectures")
    if archs is not None and not (
        isinstance(archs, list) and all(isinstance(a, str) for a in archs)
    ):
        example = '(e.g. ["LlamaForCausalLM"])'
        return f"architectures is {str(archs)[:60]}, not a list of class names {example}"
    kind = config.get("model_type")
    if kind is not None and not isinstance(kind, str):
        return f'model_type is {str(kind)[:60]}, not a name (e.g. "llama")'
    return None


def remote_code_refusal(folder: Path) -> CompactnnError | None:
    """The error for a Hugging Face folder whose model is code compactnn does not run: an
    ``auto_map`` (the folder ships its own model code) or an ``architectures`` class that
    ``transformers`` does not have; else None. Loading it as a stock class would compress
    (and evaluate) another network than the one saved, so it is refused, never substituted.
    A ``config.json`` nested deeper than Python's JSON parser follows is refused too; any
    other unreadable one (missing, a FIFO, not JSON) is left to transformers' own error.

    Example:
        >>> remote_code_refusal(Path("no-such-folder")) is None
        True
    """
    config_path = folder / "config.json"
    try:  # stat before open: a FIFO's open would block
        config = json.loads(read_regular_bytes(config_path, "use the model's own config.json."))
    except RecursionError:
        return CompactnnError(
            f"{str(config_path)!r} nests its JSON deeper than Python's parser follows, so it "
            "is not a Hugging Face config: use the config.json saved with the model."
        )
    except ValueError:  # CompactnnError (missing, special, unreadable), not JSON, not UTF-8
        return None
    if not isinstance(config, dict):
        return None
    if (bad := _mistyped_field(config)) is not None:
        return CompactnnError(
            f"{str(config_path)!r}: {bad}; use the config.json saved with the model."
        )
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else None
    if auto_map is not None:  # a tokenizer's or processor's own code changes no weight
        auto_map = {k: v for k, v in auto_map.items() if str(k) not in PREPROCESSING_AUTO} or None
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs else None
    stock = transformers_model_class(name) if name is not None else None
    if auto_map is None and (name is None or stock is not None or not _known_type(config)):
        return None  # an unknown model_type: unknown_model_type's message says what to do
    where = str(config_path)
    auto = next((k for k in auto_map or {} if str(k).startswith("AutoModel")), "AutoModel")
    trusted = f"{auto}.from_pretrained(folder, trust_remote_code=True), if you trust that code"
    if auto_map is None:
        from compactnn._optional import require

        version = require("transformers", "hf").__version__
        return CompactnnError(
            f"{where!r} names the architecture {str(name)[:80]!r}, which transformers {version} "
            "does not have, and compactnn never runs model code from elsewhere (compressing it "
            "as a stock class could compress another network): use a checkpoint saved from a "
            "transformers class (or a transformers release that has this one), or load it "
            "yourself in Python with its own class and pass the module to "
            "compactnn.compress(model, ...)."
        )
    yourself = f"load it yourself in Python ({trusted}) and pass the module to compactnn.compress"
    files = _code_files(auto_map)
    if stock is None:
        return CompactnnError(
            f"{where!r} names the architecture {str(name)[:80]!r} with an auto_map: its code is "
            f"in the folder ({files}), and compactnn never runs code from a model folder (nor "
            f"compresses it as another class): {yourself}(model, ...), or use a checkpoint of a "
            "stock transformers architecture."
        )
    return CompactnnError(
        f"{where!r} has an auto_map: the folder ships its own model code ({files}), which "
        f"compactnn never runs, and it may differ from transformers' {name}: if that code is "
        f"transformers' own {name} (a model since added to transformers), delete auto_map from "
        f"config.json; otherwise {yourself}(model, ...)."
    )


# Weights a skeleton may have per byte of its artifact's files: 64 x 8 (1/64 bit per weight, far
# below any format compactnn writes, 90%-sparse 1-bit layers included). A header edited to ask
# for a huge model (e.g. vocab_size=1e9: a 256 GB skeleton) is refused before it is allocated.
MAX_WEIGHTS_PER_BYTE = 512


def _check_skeleton_size(root: Path, cls: type, config: Any) -> None:
    """Refuse a config whose model has far more weights than the artifact could hold; the
    count comes from a build on the meta device (no memory). A config that does not build
    there is left to the real build's own error."""
    try:
        with torch.device("meta"):
            weights = sum(p.numel() for p in cls(config).parameters())
    except Exception:  # the real build reports it
        return
    if not root.is_dir():
        return  # no files to compare with (the artifact's own checks come first)
    stored = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    if weights > MAX_WEIGHTS_PER_BYTE * max(stored, 1):
        raise ArtifactError(
            f"artifact {str(root)!r}: its header's config builds a model of {weights:,} "
            f"weights, more than its {stored:,} bytes of files can hold; the header was edited "
            "or does not belong to these files. Re-save the artifact."
        )


def no_random_init() -> contextlib.AbstractContextManager:
    """transformers' ``no_init_weights`` block (a model built inside skips its random
    initialisation), from where this transformers has it (``initialization`` since 5,
    ``modeling_utils`` before); a plain block when it has none."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(where).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _build(root: Path, cls: type, settings: dict[str, Any]) -> nn.Module:
    """``cls`` built from ``settings`` without its random initialisation (the artifact's
    weights replace every parameter and stored buffer) and without a draw from the caller's
    torch generators (a constructor's own ``torch.randn`` runs on a forked state). Its tables
    are tied afterwards, as ``from_pretrained`` ties them: ``no_init_weights`` skips that too."""
    with forked_rng():
        with no_random_init():
            _check_skeleton_size(root, cls, cls.config_class.from_dict(settings))
            model = cls(cls.config_class.from_dict(settings))
        model.tie_weights()
    return model


def skeleton_from_header(root: Path, header: dict[str, Any]) -> nn.Module:
    """A float model of the saved architecture; needs a saved Hugging Face config.

    The header's ``extra.hf`` is data: the class must be in :data:`HF_ARCHITECTURES` and a
    ``PreTrainedModel`` subclass in ``transformers``; the config is built by that class's own
    config class from the saved dict, without ``auto_map`` and without remote code.
    """
    hf = header.get("extra", {}).get("hf")
    if not isinstance(hf, dict) or not hf:
        raise ArtifactError(
            f"artifact {str(root)!r} holds a {header.get('model_class')!r:.80} without a saved "
            "architecture: pass the float model as load(path, model=...)."
        )
    name, config = hf.get("class"), hf.get("config")
    cls = transformers_model_class(name) if name in HF_ARCHITECTURES else None
    if cls is None:
        raise ArtifactError(
            f"artifact {str(root)!r} names the architecture {str(name)[:80]!r}, which is not "
            f"one compactnn rebuilds from a header ({', '.join(sorted(HF_ARCHITECTURES)[:4])}, "
            "...): pass the float model as load(path, model=...)."
        )
    if not isinstance(config, dict) or config.get("model_type") != cls.config_class.model_type:
        raise ArtifactError(
            f"artifact {str(root)!r} has no valid {cls.config_class.model_type!r} config for "
            f"{name!r}: pass the float model as load(path, model=...)."
        )
    archs = config.get("architectures")
    saved = archs[0] if isinstance(archs, list) and archs else None
    if config.get("auto_map") and saved is not None and transformers_model_class(saved) is None:
        raise ArtifactError(  # made before compactnn refused such folders (session 34)
            f"artifact {str(root)!r} was made from a folder whose model is {str(saved)[:80]!r}, "
            f"code in that folder (auto_map) that compactnn never ran, compressed as "
            f"transformers' {name}, another network: compress it again from the model loaded "
            "with its own code (in Python, trusting that code), or pass load(path, model=...) "
            f"a {name} if you accept it as one."
        )
    settings = {k: v for k, v in config.items() if k not in ("auto_map", "trust_remote_code")}
    try:
        return _build(root, cls, settings)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(
            f"artifact {str(root)!r} has a {name!r} config that does not build: {exc}"
        ) from exc
