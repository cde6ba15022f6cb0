"""One way to export a float model to ONNX, shared by the kernels, measurement and bench.

Keyword-input models (Hugging Face: ``input_ids=``, ``attention_mask=``) are called
positionally and return their main tensor, because the TorchScript exporter traces
positional tensors more reliably than keyword arguments. Batch (and, for keyword inputs,
sequence) axes are dynamic, the output's axis 1 only where it follows the sequence length
(:func:`output_axes`: a classifier's logits keep ``num_labels``); opset 17. The caller
checks that ``onnx`` is installed.

A Hugging Face model is exported with its eager attention (on the copy that is traced): the
``scaled_dot_product_attention`` export scales queries and keys apart and adds nodes that
ONNX Runtime runs one by one. Measured on all-MiniLM-L6-v2 at batch 1 (33 tokens, 2 threads,
AMD Zen 4): ONNX Runtime fp32 6.1-6.2 -> 6.0 ms, its MatMulNBits form 5.1-5.4 -> 4.9 ms.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import IO, Any

import torch
from torch import nn

from compactnn.core.calib import main_output


class KeywordsAsPositional(nn.Module):
    """Calls a keyword-input model positionally and returns its main tensor."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return main_output(self.model(**dict(zip(self.names, args, strict=True))))


def eager_attention(model: nn.Module) -> None:
    """Switch every Hugging Face module of ``model`` (in place) that has another attention
    implementation to its eager one (the same math; see the module docstring)."""
    for m in model.modules():
        config = getattr(m, "config", None)
        if not hasattr(m, "set_attn_implementation") or config is None:
            continue
        if getattr(config, "_attn_implementation", "eager") != "eager":
            with contextlib.suppress(Exception):  # a model without an eager form keeps its own
                m.set_attn_implementation("eager")


def export_dynamic(
    model: nn.Module, example: Any, path: str | os.PathLike | IO[bytes]
) -> list[str]:
    """Export a copy of ``model`` (eval mode) traced on ``example`` to ``path``.

    Args:
        model: the float model; not modified (tracing may change a model's settings).
        example: a tensor, a tuple of tensors, or a dict of keyword tensors.
        path: the ``.onnx`` file to write, or a binary file object (e.g. ``io.BytesIO``).

    Returns:
        The ONNX input names (the dict's keys, else ``input_0``, ``input_1``, ...); the
        output is named ``output``.

    Example:
        >>> export_dynamic(model, images[:2], "m.onnx")  # doctest: +SKIP
        ['input_0']
    """
    model = copy.deepcopy(model).eval()
    eager_attention(model)
    if isinstance(example, dict):
        names = list(example)
        model, args = KeywordsAsPositional(model, names), tuple(example[n] for n in names)
        dims = {n: {0: "batch", 1: "seq"} for n in names}
        dims["output"] = output_axes(model, args)
    else:
        args = example if isinstance(example, tuple) else (example,)
        names = [f"input_{i}" for i in range(len(args))]
        dims = {n: {0: "batch"} for n in [*names, "output"]}
    with exporting(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            path if hasattr(path, "write") else str(path),
            input_names=names,
            output_names=["output"],
            dynamic_axes=dims,
            opset_version=17,
            dynamo=False,
        )
    return names


def output_axes(model: nn.Module, args: tuple) -> dict[int, str]:
    """The dynamic axes of the output of ``model`` (called positionally on token inputs
    ``args``, sequence on axis 1): the batch, and axis 1 as ``seq`` only when it follows the
    sequence length, i.e. when the model run on ``args`` and on them one token shorter (one
    longer for a single token) gives it both lengths. A classifier's ``(batch, num_labels)``
    logits keep ``num_labels`` fixed (declared ``seq``, they read as sequence-long).

    Example:
        >>> output_axes(KeywordsAsPositional(classifier, ["input_ids"]), (ids,))  # doctest: +SKIP
        {0: 'batch'}
    """
    seq = next((a.shape[1] for a in args if a.dim() > 1), None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(*args)
        tensor = isinstance(out, torch.Tensor) and out.dim() > 1
        if seq is None or not tensor or out.shape[1] != seq:
            return {0: "batch"}
        other = seq - 1 if seq > 1 else 2
        try:  # a model that runs one length only: its output's axis 1 is the sequence's
            shorter = model(*(_with_length(a, seq, other) for a in args))
        except Exception:
            return {0: "batch", 1: "seq"}
    follows = shorter.dim() > 1 and shorter.shape[1] == other
    return {0: "batch", 1: "seq"} if follows else {0: "batch"}


def _with_length(value: torch.Tensor, seq: int, length: int) -> torch.Tensor:
    """``value`` with its sequence axis (1, when ``seq`` long) cut or extended (its last
    token repeated) to ``length``."""
    if value.dim() < 2 or value.shape[1] != seq:
        return value
    if length <= seq:
        return value[:, :length]
    return torch.cat([value, value[:, -1:].expand(-1, length - seq, *value.shape[2:])], 1)


@contextlib.contextmanager
def _stdout_captured() -> Iterator[None]:
    """Send what is written to the standard output, by Python or by C++ (the TorchScript
    exporter prints the whole graph there when it fails), to a discarded temporary file."""
    sys.stdout.flush()
    _flush_c_stdio()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedding host): Python's writes only
        with contextlib.redirect_stdout(io.StringIO()):
            yield
        return
    try:
        with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()):
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                _flush_c_stdio()
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _flush_c_stdio() -> None:
    """``fflush(NULL)``: C stdio buffers (where C++ ``std::cout`` writes) reach their files."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library by that name (Windows)
        pass


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """Settings for a TorchScript ``torch.onnx.export`` call: no autograd; PyTorch's fused
    ``nn.MultiheadAttention`` fast path off (``aten::_native_multi_head_attention`` has no
    ONNX form; the exporter then sees the decomposed ops), restored after; the exporter's
    deprecation notices, the decomposed attention's tracer warnings and those of
    ``torch._assert`` filtered (they say nothing a user can act on) and what it prints on the
    standard output (the whole graph, when it fails) discarded."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _stdout_captured():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message="The feature will be removed")
            # the decomposed attention's own shape checks (constants for one export)
            warnings.filterwarnings(
                "ignore", category=torch.jit.TracerWarning, module="torch.nn.functional"
            )
            # ``torch._assert`` checks in model code (torchvision's ViT checks the image size)
            # and the tensor formatted into their message: constants for one export too
            warnings.filterwarnings(
                "ignore", ".*to a Python boolean", torch.jit.TracerWarning, r"torch\Z"
            )
            warnings.filterwarnings(
                "ignore", ".*to a Python number", torch.jit.TracerWarning, r"torch\._tensor\Z"
            )
            torch.backends.mha.set_fastpath_enabled(False)
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
