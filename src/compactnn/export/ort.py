"""ONNX Runtime sessions set up one way for the whole package (CPU, explicit threads, no
spinning), and a callable that runs one like a torch model.

Used by :mod:`compactnn.export.onnx` (verifying an export), the ``onnxruntime`` backend of
:func:`compactnn.deploy` and the benchmark's ONNX Runtime peers. Needs the ``onnx`` extra.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from compactnn._optional import require
from compactnn.errors import CompactnnError


def inference_session(
    model: bytes | str | os.PathLike, threads: int | None = None, *, spinning: bool = False
) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for a serialized model or a file.

    Args:
        model: the ONNX model as bytes, or the path of a ``.onnx`` file.
        threads: intra-op threads; None uses ``torch.get_num_threads()``.
        spinning: let idle intra-op threads spin (ONNX Runtime's default; measured by the
            ``deploy`` benchmark, not used by the library).

    Returns:
        The session, with every graph optimization on and idle threads that do not spin.
    """
    ort = require("onnxruntime", "onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle threads that spin steal the CPU from the caller's next work and from the other
    # jobs of a shared machine (and from the contender timed next in interleaved benchmarks)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    source = os.fspath(model) if isinstance(model, os.PathLike) else model
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_callable(
    data: bytes, threads: int | None = None, *, spinning: bool = False
) -> Callable[..., Any]:
    """A function that runs the serialized ONNX model ``data`` on torch tensors.

    Positional arguments feed the model's inputs in order, keyword arguments by name (extra
    names are ignored); one output comes back as a tensor, several as a tuple.

    Example:
        >>> run = ort_callable(to_onnx_bytes(qmodel, x)[0])  # doctest: +SKIP
        >>> y = run(x)                                       # doctest: +SKIP
    """
    sess = inference_session(data, threads, spinning=spinning)
    names = [i.name for i in sess.get_inputs()]

    def run(*args: Any, **kwargs: Any) -> Any:
        feeds = dict(zip(names, args, strict=False)) | kwargs
        feeds = {k: v.detach().cpu().numpy() for k, v in feeds.items() if k in names}
        outs = [torch.from_numpy(o) for o in sess.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return run


def optimized_graph(model: bytes | str | os.PathLike, level: str = "all") -> Any:
    """The graph ONNX Runtime actually runs for ``model``, after its optimizations.

    Use it to check which QDQ patterns were fused into integer kernels (``QLinearConv``,
    ``QLinearAdd``, ...) and which nodes stayed float.

    Args:
        model: the ONNX model as bytes, or the path of a ``.onnx`` file.
        level: ``"basic"``, ``"extended"`` or ``"all"`` (what :func:`inference_session` runs;
            its layout changes are specific to this CPU).

    Returns:
        The optimized ``onnx.ModelProto``.

    Example:
        >>> ops = [n.op_type for n in optimized_graph(data).graph.node]  # doctest: +SKIP
    """
    ort = require("onnxruntime", "onnx")
    onnx = require("onnx", "onnx")
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise CompactnnError(f"level={level!r} is unknown; use one of {tuple(levels)}.")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.log_severity_level = 3  # the "hardware specific" notice is what we ask for here
    source = os.fspath(model) if isinstance(model, os.PathLike) else model
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)
