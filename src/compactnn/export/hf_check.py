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
    ``qmodel`` on :func:`probe_ids`; returns the mean cosine of their main outputs.

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
    ids = probe_ids(qmodel)
    modes = [(m, m.training) for m in qmodel.modules()]
    try:
        with torch.no_grad():
            sim = main_output(qmodel.eval()(input_ids=ids))
            with _quiet_transformers():  # compressed-tensors decompresses on this first call
                got = main_output(loaded.eval()(input_ids=ids))
    finally:
        for m, training in modes:
            m.training = training
    cos = mean_cosine(sim, got) if sim.shape == got.shape else float("nan")
    if not cos >= MIN_COSINE:  # NaN fails too
        raise CompactnnError(
            f"compressed-tensors export: the folder loaded by transformers gives outputs of "
            f"mean cosine {cos:.6f} to the simulated model (below {MIN_COSINE}); nothing was "
            "written. Save with compactnn.save."
        )
    return cos
