"""Checks of an exported Hugging Face model against compactnn's simulation: the mean cosine
of their outputs, and a compressed-tensors folder reloaded with plain ``transformers``
(:func:`verify_folder`) before the export keeps it."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.modules import eval_mode
from compactnn.errors import CompactnnError, first_line, name_list

EXTRA = "export"
MIN_COSINE = 0.999  # the reloaded folder's outputs against the simulation (mean per token)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of the last-dimension vectors (tokens) of ``a`` and ``b``."""
    a, b = a.float().flatten(0, -2), b.float().flatten(0, -2)
    return float(nn.functional.cosine_similarity(a, b, dim=-1).mean())


def probe_ids(qmodel: nn.Module, batch: int = 2, length: int = 8) -> torch.Tensor:
    """Seeded token ids in ``qmodel``'s vocabulary, no longer than its positions allow."""
    vocab = qmodel.get_input_embeddings().num_embeddings
    config = qmodel.config
    most = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    length = min(length, most) if most else length
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def other_layers(qmodel: nn.Module) -> list[tuple[str, str]]:
    """``(name, class)`` of the quantized layers that are not Linear layers or token tables
    (a ViT's patch-embedding Conv2d), which the Hugging Face formats have no form for."""
    from compactnn.core.qembedding import QuantEmbedding
    from compactnn.core.qlayers import QuantLinear, has_integer_weight

    return [
        (name, type(m).__name__)
        for name, m in qmodel.named_modules()
        if has_integer_weight(m) and not isinstance(m, (QuantLinear, QuantEmbedding))
    ]


def ignore_fix(layers: list[tuple[str, str]], fmt: str) -> str:
    """The refusal for :func:`other_layers`: names them and the ``--ignore`` that keeps them
    float (the rest of the recipe goes to ``fmt`` as it is)."""
    names = [n for n, _ in layers]
    kinds = sorted({k for _, k in layers})
    shown = names[:3]
    flags = " ".join(f"--ignore {n}" for n in shown) + (" ..." if len(names) > 3 else "")
    return (
        f"{len(names)} quantized layer(s) are not Linear layers ({name_list(names, 3)}: "
        f"{', '.join(kinds)}) and {fmt} has no form for them: compress again with {flags} "
        f"(Python: ignore={shown!r}) to leave them float, or save with compactnn.save."
    )


def _size2(value: Any) -> tuple[int, int] | None:
    """An image size of a config (``224`` or ``[224, 224]``) as (height, width), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return value[0], value[1]
    return None


def probe_inputs(qmodel: nn.Module, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    """Seeded keyword inputs for ``qmodel``: ``input_ids`` (:func:`probe_ids`) for a token
    model, ``pixel_values`` of the config's ``num_channels`` x ``image_size`` for an image
    model (``main_input_name == "pixel_values"``, e.g. ViT).

    Raises:
        CompactnnError: the model reads neither token ids nor an image of a size its config
            gives (audio models, a config without ``image_size``).
    """
    config = getattr(qmodel, "config", None)
    main = getattr(qmodel, "main_input_name", "input_ids")
    kind = type(qmodel).__name__
    if main == "pixel_values":
        size = _size2(getattr(config, "image_size", None))
        channels = getattr(config, "num_channels", 3)
        if size is None or not isinstance(channels, int) or channels < 1:
            raise CompactnnError(
                f"{kind} reads images, and its config gives no image_size / num_channels to "
                "build a check input from; save with compactnn.save."
            )
        gen = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(batch, channels, *size, generator=gen)}
    try:
        emb = qmodel.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # no token table
        emb = None
    if main != "input_ids" or not isinstance(getattr(emb, "num_embeddings", None), int):
        raise CompactnnError(
            f"{kind} reads {main!r}, not token ids or an image: compactnn cannot build an input "
            "to check its export with; save with compactnn.save."
        )
    return {"input_ids": probe_ids(qmodel, batch, length)}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report and compressed-tensors' progress bars (plain tqdm on
    stderr) while the folder is loaded and run: the caller checks what they would say."""
    transformers = require("transformers", EXTRA)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _key_name(key: Any) -> str:
    """A loading-info entry's weight name (mismatched keys are ``(name, shape, shape)``)."""
    return str(key[0] if isinstance(key, tuple) else key)


def verify_folder(qmodel: nn.Module, folder: str | os.PathLike) -> float:
    """Load ``folder`` with plain transformers (``type(qmodel).from_pretrained``), run it and
    ``qmodel`` on :func:`probe_inputs`; returns the mean cosine of their main outputs.

    ``qmodel``'s train/eval modes are restored. Costs a second, dequantized copy of the
    model and one forward pass on 2 x 8 tokens.

    Raises:
        CompactnnError: the folder does not load (missing, unexpected or mis-shaped weights,
            or an error) or its outputs are further than :data:`MIN_COSINE` from ``qmodel``'s.
    """
    from compactnn.core.calib import main_output

    try:
        with _quiet_transformers():  # mis-shaped weights: named below, not raised
            loaded, info = type(qmodel).from_pretrained(
                str(folder),
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except Exception as exc:
        raise CompactnnError(
            f"compressed-tensors export: plain transformers cannot load the folder "
            f"({first_line(exc)}); nothing was written. Save with compactnn.save."
        ) from exc
    misfit = [
        f"{kind} {name_list(sorted(_key_name(k) for k in info[key]), 2)}"
        for key, kind in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                          ("mismatched_keys", "mis-shaped"))
        if info.get(key)
    ]  # fmt: skip
    if misfit:
        raise CompactnnError(
            f"compressed-tensors export: plain transformers does not load the folder as "
            f"written ({'; '.join(misfit)}); nothing was written. Save with compactnn.save."
        )
    inputs = probe_inputs(qmodel)
    with torch.no_grad(), eval_mode(qmodel):
        sim = main_output(qmodel(**inputs))
        with _quiet_transformers():  # compressed-tensors decompresses on this first call
            got = main_output(loaded.eval()(**inputs))
    cos = mean_cosine(sim, got) if sim.shape == got.shape else float("nan")
    if not cos >= MIN_COSINE:  # NaN fails too
        raise CompactnnError(
            f"compressed-tensors export: the folder loaded by transformers gives outputs of "
            f"mean cosine {cos:.6f} to the simulated model (below {MIN_COSINE}); nothing was "
            "written. Save with compactnn.save."
        )
    return cos
