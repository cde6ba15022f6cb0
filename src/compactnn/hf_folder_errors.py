"""One-line messages for a Hugging Face model folder that cannot be loaded: no weights that
transformers reads, pickled weights only, weights whose shapes do not match ``config.json``,
a ``model_type`` the installed transformers does not know (:mod:`compactnn.model_io` loads)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from compactnn.errors import CompactnnError, name_list
from compactnn.export.user_files import check_regular, index_weight_map, not_regular, special_kind

# The safetensors weights transformers' from_pretrained reads from a folder (no variant).
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def has_safetensors_weights(path: Path) -> bool:
    """Whether ``path`` holds the ``.safetensors`` weights transformers reads (another
    ``*.safetensors`` file beside them is not loaded, so it does not count)."""
    return any((path / name).is_file() for name in SAFETENSORS_WEIGHTS)


def weights_refusal(path: Path, trust_pickle: bool) -> CompactnnError | None:
    """The error for a folder without ``model.safetensors`` (or its shard index): no weights
    at all, or pickled ``pytorch_model*.bin`` weights without ``trust_pickle``; else None.

    Example:
        >>> weights_refusal(Path("no-such-folder"), False).args[0][:40]
        "'no-such-folder' has no weights: a Huggi"
    """
    if (special := special_weights(path)) is not None:
        return special
    if has_safetensors_weights(path):
        return index_refusal(path)
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin*"))
    others = sorted(p.name for p in path.glob("*.safetensors") if p.name not in SAFETENSORS_WEIGHTS)
    stray = (
        f" ({name_list(others, 3)} {'is' if len(others) == 1 else 'are'} not "
        "model.safetensors, so transformers does not read "
        f"{'it' if len(others) == 1 else 'them'})"
        if others
        else ""
    )
    if not pickles:
        return CompactnnError(
            f"{str(path)!r} has no weights: a Hugging Face folder holds model.safetensors (or "
            f"model.safetensors.index.json and its shards) beside config.json{stray}. Save the "
            "model there with save_pretrained(folder), or pass the folder that holds its weights."
        )
    if trust_pickle:
        return None
    return CompactnnError(
        f"refusing to load {str(path)!r}: its weights are {pickles[0]}, a pickle (unpickling "
        f"can run code), and it has no model.safetensors{stray}. Save the model with "
        "save_pretrained(..., safe_serialization=True), or pass --trust-pickle if you trust "
        "its author."
    )


def special_weights(path: Path) -> CompactnnError | None:
    """The error for a ``model.safetensors`` (or shard index) that is there but is not a
    regular file: a FIFO (whose open would wait forever), a device, a folder, a link to one of
    these, or a broken link; else None. Only ``stat`` is called: nothing is opened.

    Example:
        >>> special_weights(Path("no-such-folder")) is None
        True
    """
    for name in SAFETENSORS_WEIGHTS:
        if special_kind(path / name) is not None:
            return CompactnnError(
                f"{not_regular(path / name)}, and transformers reads weights from a regular "
                f"file: put the real {name} there, or save the model in the folder with "
                "save_pretrained(folder)."
            )
    return None


def index_refusal(path: Path) -> CompactnnError | None:
    """The error for a shard index transformers would read (no ``model.safetensors`` beside
    it) that is not a JSON object with a ``weight_map`` of shard files, or that names a shard
    that is missing or not a regular file (a FIFO shard would block the load forever); else
    None."""
    index = path / SAFETENSORS_WEIGHTS[1]
    if (path / SAFETENSORS_WEIGHTS[0]).is_file() or not index.is_file():
        return None
    fix = "save the model again with save_pretrained(folder)."
    try:
        for shard in sorted(set(index_weight_map(index, fix).values())):
            check_regular(path / shard, f"{index.name} names it as a shard; {fix}")
    except CompactnnError as exc:
        return exc
    return None


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape (.+?) from checkpoint, "
    r"the shape in current model is (.+?)\.(?:\s|$)"
)


def mismatched_shapes(exc: BaseException) -> list[tuple[str, Any, Any]]:
    """``(name, shape in the weights, shape config.json makes)`` for each tensor whose size
    did not match, from transformers' load error: its load report (transformers 5 logs the
    report and raises "For details look at the above report!", which compactnn hides) or
    the "size mismatch for ..." lines of ``load_state_dict`` (transformers 4)."""
    tb = exc.__traceback__
    while tb is not None:  # the report's loading_info, in the frame that raised
        info = tb.tb_frame.f_locals.get("loading_info")
        keys = getattr(info, "mismatched_keys", None)
        if keys:
            return [(str(k), a, b) for k, a, b in sorted(keys, key=lambda t: str(t[0]))]
        tb = tb.tb_next
    return [(m[1], _size(m[2]), _size(m[3])) for m in _SIZE_MISMATCH.finditer(str(exc))]


def _size(text: str) -> str:
    """``"torch.Size([32, 8])"`` -> ``"[32, 8]"``."""
    return re.sub(r"^torch\.Size\((.*)\)$", r"\1", text.strip())


def _shape(shape: Any) -> str:
    return shape if isinstance(shape, str) else str(list(shape))


def mismatch_message(exc: BaseException, path: Path) -> str | None:
    """One self-contained line when the weights' shapes do not match ``config.json``;
    None for any other load error."""
    shapes = mismatched_shapes(exc)
    text = str(exc)
    if not shapes and "ignore_mismatched_sizes" not in text and "size mismatch" not in text:
        return None
    if shapes:
        first = [
            f"{k} is {_shape(a)} in the weights, {_shape(b)} by config.json"
            for k, a, b in shapes[:3]
        ]
        more = f" (and {len(shapes) - 3} more)" if len(shapes) > 3 else ""
        what = f": {'; '.join(first)}{more}"
    else:
        what = ""
    return (
        f"the weights in {str(path)!r} do not match its config.json{what}; check config.json's "
        "sizes (vocab_size, hidden_size, intermediate_size, num_hidden_layers, head counts) "
        "against the weights, or use the config.json saved with them."
    )


def unknown_model_type(transformers: Any, path: Path) -> str | None:
    """One line when ``config.json``'s ``model_type`` is not one the installed transformers
    knows (a newer model, or a custom one whose code compactnn never runs); else None."""
    try:
        model_type = json.loads((path / "config.json").read_text())["model_type"]
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
            return None
    except Exception:  # unreadable config.json or another layout: transformers' error stands
        return None
    return (
        f"{str(path / 'config.json')!r} has model_type {model_type[:80]!r}, which the installed "
        f"transformers {transformers.__version__} does not know (compactnn never runs code "
        "from a model folder): upgrade transformers to a release that has this model type, or "
        "load the model yourself in Python with its own code (if you trust it) and pass the "
        "module to compactnn.compress(model, ...)."
    )
