"""Rebuilding a model skeleton from what an artifact records, when no skeleton is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn.errors import ArtifactError


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
    settings = {k: v for k, v in config.items() if k not in ("auto_map", "trust_remote_code")}
    _check_skeleton_size(root, cls, cls.config_class.from_dict(settings))
    try:
        return cls(cls.config_class.from_dict(settings))
    except Exception as exc:
        raise ArtifactError(
            f"artifact {str(root)!r} has a {name!r} config that does not build: {exc}"
        ) from exc
