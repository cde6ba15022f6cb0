"""ONNX Runtime sessions set up one way for the whole package (CPU, explicit threads, no
spinning), and a callable that runs one like a torch model.

Used by :mod:`compactnn.export.onnx` (verifying an export), the ``onnxruntime`` backend of
:func:`compactnn.deploy` and the benchmark's ONNX Runtime peers. Needs the ``onnx`` extra.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from compactnn._optional import require


def inference_session(model: bytes | str | os.PathLike, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for a serialized model or a file.

    Args:
        model: the ONNX model as bytes, or the path of a ``.onnx`` file.
        threads: intra-op threads; None uses ``torch.get_num_threads()``.

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
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = os.fspath(model) if isinstance(model, os.PathLike) else model
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_callable(data: bytes, threads: int | None = None) -> Callable[..., Any]:
    """A function that runs the serialized ONNX model ``data`` on torch tensors.

    Positional arguments feed the model's inputs in order, keyword arguments by name (extra
    names are ignored); one output comes back as a tensor, several as a tuple.

    Example:
        >>> run = ort_callable(to_onnx_bytes(qmodel, x)[0])  # doctest: +SKIP
        >>> y = run(x)                                       # doctest: +SKIP
    """
    sess = inference_session(data, threads)
    names = [i.name for i in sess.get_inputs()]

    def run(*args: Any, **kwargs: Any) -> Any:
        feeds = dict(zip(names, args, strict=False)) | kwargs
        feeds = {k: v.detach().cpu().numpy() for k, v in feeds.items() if k in names}
        outs = [torch.from_numpy(o) for o in sess.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return run
