"""Resident memory of each report row's delivered model, measured in a fresh process.

A row's memory is that of the form its latency column times: the float row on the float
path that won (fp32 eager, bf16 autocast, ONNX Runtime fp32, ...), a deployed CNN as
``compactnn.deploy(load(artifact), backend=<the row's backend>)``, a transformer as
``load(artifact, kernels=True)`` (what ``to_kernels`` gives), a plain float (e.g.
channel-pruned) model on its float path, a simulated row as the simulated model. Each is
built from the saved artifact by a builder of this module in a child process
(:func:`compactnn.measure.memory.resident_memory`): :func:`setup` loads the input batch and the
float skeleton first, and :data:`PRELOAD` imports the heavy libraries for every row alike, so
neither counts as the model's. Nothing a child reads is unpickled: the batch and the float
model's tensors are safetensors files, and the float model is rebuilt by a trusted
constructor its record names (:func:`~compactnn.report.plain_model.float_record`: classes
of ``torch.nn`` / ``compactnn``, an allow-listed Hugging Face architecture, or the MODEL the
user named).

Example:
    >>> how = memory_job("cnn", "w8a8", "oneDNN int8", deployed, "ort-fp32")  # doctest: +SKIP
    >>> how                                                                    # doctest: +SKIP
    ('deploy', 'onednn')
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from compactnn.core.calib import call_model
from compactnn.errors import first_line
from compactnn.measure import memory
from compactnn.measure.float_paths import BF16, COMPILE, EAGER, ORT, ORT_FUSED
from compactnn.report.delivery import FLOAT_PATH_NAMES, PROBE_PRUNED, SIMULATED
from compactnn.report.plain_model import (
    RECORD,
    _write,
    float_record,
    load_batch,
    rebuild_float,
    save_batch,
)

HERE = "compactnn.report.resident"
# imported in every child before its first reading, for every row alike, so that libraries
# are not counted as the model's memory: deploy pulls in torch._dynamo (~1,600 modules:
# sympy, scipy...), the ONNX Runtime backend the ONNX exporter, transformer rows transformers
PRELOAD = (
    "onnx",
    "onnxruntime",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "torch._dynamo",
    "torch.export",
    *memory.LIBRARY,
    "compactnn.export.artifact",
    "compactnn.export.onnx",
    "compactnn.export.ort",
    "compactnn.deployment",
    "compactnn.kernels.swap",
    "compactnn.measure.float_paths",
)


def installed_preload() -> tuple[str, ...]:
    """:data:`PRELOAD` without the modules whose package is not installed (optional extras)."""
    import importlib.util

    return tuple(m for m in PRELOAD if importlib.util.find_spec(m.split(".")[0]) is not None)


DELIVERIES = ("float", "deploy", "kernels", "float-path", "as-is")
WORKERS = 2  # children measured at once (memory is per process; the timings are over)


def memory_job(
    kind: str, recipe: str, runtime: str, delivered: Any, float_path: str
) -> tuple[str, str | None]:
    """How a row's delivered model is rebuilt for the measurement: ``(delivery, detail)``.

    ``("float", path)``: the float model on float path ``path`` (the float row);
    ``("deploy", backend)``; ``("kernels", None)``; ``("float-path", path)``: a plain float
    compressed model on its float path; ``("as-is", None)``: simulated or probe-pruned.

    Example:
        >>> memory_job("cnn", "w2a4", "simulated", None, "ort-fp32")
        ('as-is', None)
        >>> memory_job("cnn", "ch50", "ONNX Runtime fp32", None, "fp32-eager")
        ('float-path', 'ort-fp32')
    """
    if recipe == "float":
        return "float", float_path
    if runtime in (SIMULATED, PROBE_PRUNED):
        return "as-is", None
    if getattr(delivered, "is_deployed", False):
        return "deploy", delivered.backend
    if kind == "transformer" or hasattr(delivered, "_compactnn_kernels"):
        return "kernels", None
    path = {name: key for key, name in FLOAT_PATH_NAMES.items()}.get(runtime)
    if path is None:
        raise ValueError(f"no builder for a row that runs on {runtime!r}")
    return "float-path", path


def float_form(model: nn.Module, path: str, example: Any, threads: int | None) -> nn.Module:
    """``model`` on the float path named ``path`` (``"fp32-eager"``, ``"ort-fp32"``, ...),
    built as :func:`compactnn.measure.float_paths.float_contenders` builds it."""
    from compactnn.measure.float_paths import Bf16Autocast, compiled, ort_float

    model = model.eval()
    if path == EAGER:
        return model
    if path == BF16:
        return Bf16Autocast(model)
    if path in (ORT, ORT_FUSED):
        return ort_float(model, example, threads, fused=path == ORT_FUSED)
    if path == COMPILE:
        return compiled(model, example)
    raise ValueError(f"unknown float path {path!r}")


def setup(
    batch_path: str, skeleton_path: str | None = None, source: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a builder needs that is not the model, loaded before the first reading: the
    input batch and the float skeleton
    (:func:`~compactnn.report.plain_model.rebuild_float`), both from safetensors. ``source``:
    the MODEL the user named, from the parent's arguments (:func:`job`), never from a file."""
    context = {"batch": load_batch(batch_path), "source": source}
    if skeleton_path is not None:
        context["skeleton"] = rebuild_float(skeleton_path, source)
    return context


def build(
    context: dict[str, Any], artifact: str, delivery: str, detail: str | None, threads: int
) -> Any:
    """A row's delivered model, rebuilt from its saved ``artifact`` as :func:`memory_job`
    says, as a zero-argument call of it on the batch returning its output (a
    ``resident_memory`` builder).

    ``"float"``: ``artifact`` is the float model :func:`save_inputs` saved (not a skeleton:
    it is the model measured); the others load the compactnn artifact into the skeleton.
    """
    import compactnn

    batch = context["batch"]
    if delivery == "float":
        model = rebuild_float(artifact, context.get("source"))
        return partial(call_model, float_form(model, detail, batch, threads), batch)
    if delivery == "kernels":
        fast = compactnn.load(artifact, context.get("skeleton"), kernels=True)
        return partial(call_model, fast, batch)
    qmodel = compactnn.load(artifact, model=context["skeleton"])
    if delivery == "deploy":
        fast = compactnn.deploy(qmodel, backend=detail, example=batch, time_float=False)
    elif delivery == "float-path":
        fast = float_form(qmodel, detail, batch, threads)
    elif delivery == "as-is":
        fast = qmodel
    else:
        raise ValueError(f"unknown delivery {delivery!r}; one of {DELIVERIES}")
    del qmodel  # only what the delivered model keeps counts
    return partial(call_model, fast, batch)


def save_inputs(
    folder: Path, model: nn.Module, batch: Any, source: dict[str, Any] | None = None
) -> tuple[str, str]:
    """Save the float ``model`` (skeleton and float row: its tensors and a
    :func:`~compactnn.report.plain_model.float_record`) and ``batch`` as safetensors files in
    ``folder``; returns their paths. ``source``: the MODEL the user named, for a model of
    other classes.

    Raises:
        ValueError: the model cannot be rebuilt without unpickling, or ``batch`` holds
            something other than tensors.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model_path, batch_path = folder / "float.safetensors", folder / "batch.safetensors"
    record, tensors = float_record(model, source)
    _write(model_path, tensors, RECORD, record)
    save_batch(batch_path, batch)
    return str(model_path), str(batch_path)


def job(
    artifact: str,
    delivery: str,
    detail: str | None,
    inputs: tuple,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The child's arguments: ``artifact`` (the saved float model for ``"float"``), how it is
    delivered (:func:`memory_job`), the ``inputs`` :func:`save_inputs` saved and ``source``
    (the MODEL the user named, with its ``trust_pickle``: passed on the child's command
    line, as the files in the folder grant no trust)."""
    model_path, batch_path = inputs
    floating = delivery == "float"
    fields = {
        "artifact": model_path if floating else artifact,
        "delivery": delivery,
        "detail": detail,
        "batch": batch_path,
        "skeleton": None if floating else model_path,
    }
    if source:
        fields["source"] = {
            "model": source.get("model"),
            "weights": source.get("weights"),
            "trust_pickle": source.get("trust_pickle") is True,
        }
    return fields


def row_job(
    row: dict[str, Any], kind: str, delivered: Any, float_path: str, out: Path, inputs: tuple
) -> dict[str, Any]:
    """The child's arguments for ``row`` (a demo row: ``recipe``, ``runtime``, ``artifact``
    relative to ``out``): :func:`job` with the row's delivery (:func:`memory_job`)."""
    delivery, detail = memory_job(kind, row["recipe"], row["runtime"], delivered, float_path)
    return job(str(out / row["artifact"]), delivery, detail, inputs)


def measure_job(job: dict[str, Any], threads: int) -> tuple[dict[str, int], str | None]:
    """Measure one row's job (:func:`row_job`) in a fresh process; returns ``(fields,
    note)``: the fields for the row (``resident_bytes``: RSS added; ``resident_anon_bytes``:
    its anonymous part; ``peak_bytes``: the most RSS that building the model and its first
    forward pass held at once above the same reading, left out where the child could not
    reset the high-water mark), or ``({}, note)`` saying why it was not measured."""
    source = [job["source"]] if job.get("source") else []  # the parent's, on the command line
    try:
        mem = memory.resident_memory(
            f"{HERE}:build",
            [job["artifact"], job["delivery"], job["detail"], threads],
            preload=installed_preload(),
            threads=threads,
            setup=f"{HERE}:setup",
            setup_args=[job["batch"], job["skeleton"], *source],
        )
    except Exception as exc:  # a failed measurement is a note, never a failed report
        return {}, f"resident memory not measured: {type(exc).__name__}: {first_line(exc, 300)}"
    fields = {"resident_bytes": mem.added, "resident_anon_bytes": mem.anon_added}
    if mem.peak_reset:  # else the imports' or the setup's high-water mark may be the peak
        fields["peak_bytes"] = mem.peak_added
    return fields, None


def measure_rows(pairs: list[tuple[dict[str, Any], dict[str, Any]]], threads: int) -> None:
    """Fill ``resident_bytes`` / ``resident_anon_bytes`` / ``peak_bytes`` of each ``(row, job)``,
    :data:`WORKERS` children at a time; a failed measurement becomes a note on its row."""
    pool = ThreadPoolExecutor(WORKERS)
    try:
        done = list(pool.map(lambda pair: measure_job(pair[1], threads), pairs))
    except BaseException:  # Ctrl-C / SIGTERM: stop the children the workers wait on
        pool.shutdown(wait=False, cancel_futures=True)
        memory.kill_children()
        raise
    finally:
        pool.shutdown(wait=True)
    for (row, _), (fields, note) in zip(pairs, done, strict=True):
        row.update(fields)
        if note:
            row["notes"].append(note)


def temporary_folder() -> tempfile.TemporaryDirectory:
    """A private folder for the float models and batches (safetensors) the children read."""
    return tempfile.TemporaryDirectory(prefix="compactnn-resident-")
