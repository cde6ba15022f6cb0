"""Rebuilding a model skeleton from what an artifact records, when no skeleton is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def skeleton_from_header(root: Path, header: dict[str, Any]) -> nn.Module:
    """A float model of the saved architecture; needs a saved Hugging Face config."""
    hf = header.get("extra", {}).get("hf")
    if not hf:
        raise ArtifactError(
            f"artifact {str(root)!r} holds a {header.get('model_class')} without a saved "
            "architecture: pass the float model as load(path, model=...)."
        )
    import transformers

    config = transformers.AutoConfig.for_model(**hf["config"])
    cls = getattr(transformers, hf["class"], None)
    if cls is None:
        raise ArtifactError(f"transformers has no class {hf['class']!r} to rebuild the model.")
    return cls(config)
