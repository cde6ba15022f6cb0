"""Peer tools and float baselines, run on the same model and data as compactnn.

Each peer returns a :class:`PeerResult` (a callable model, its bytes on disk, the time it
took to build) or raises; the caller reports the exception message as a finding. Peers are
optional: ``onnxruntime.quantization``, ``torchao`` and ``optimum-quanto`` come from
``requirements-bench.txt``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.bench.ort_quiet import quiet_ort_quantize
from compactnn.core.calib import as_batches
from compactnn.core.onnx_trace import export_dynamic
from compactnn.export.ort import inference_session
from compactnn.measure.float_paths import Bf16Autocast


@dataclass
class PeerResult:
    """A model produced by a peer tool (or a float baseline path).

    Attributes:
        model: callable like the float model (same inputs, same output structure).
        size_bytes: bytes on disk of what the peer saves (None: nothing saved).
        build_s: wall time to produce it (quantization, export or compilation).
        saved_as: how the size was measured.
    """

    model: nn.Module
    size_bytes: int | None
    build_s: float
    saved_as: str


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the float model's call signature."""

    def __init__(
        self, path: str, threads: int, input_names: list[str], hf: bool, spinning: bool = False
    ) -> None:
        super().__init__()
        # no spinning threads (unless asked): they steal the CPU from the contender timed next
        self.session = inference_session(path, threads, spinning=spinning)
        self.path = str(path)  # the ONNX file it runs (graph inspection in the benchmarks)
        self.input_names = input_names
        self.hf = hf

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        feed = dict(zip(self.input_names, args, strict=False)) | kwargs
        wanted = {i.name for i in self.session.get_inputs()}
        out = self.session.run(None, {k: v.numpy() for k, v in feed.items() if k in wanted})
        y = torch.from_numpy(out[0])
        if self.hf:
            from transformers.modeling_outputs import BaseModelOutput

            return BaseModelOutput(last_hidden_state=y)
        return y


def export_onnx(model: nn.Module, example: Any, path: Path) -> list[str]:
    """Export ``model`` to ONNX (dynamic batch and sequence axes); returns input names."""
    return export_dynamic(model, example, path)


class Scratch:
    """A temporary folder that lives as long as the objects holding it: removed when the
    last one is garbage-collected, at interpreter exit at the latest, or by :meth:`remove`.

    Example:
        >>> scratch = Scratch("compactnn-doc-")
        >>> scratch.path.is_dir(), scratch.remove() is None, scratch.path.exists()
        (True, True, False)
    """

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.remove = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)


def ort_models(model: nn.Module, example: Any, calib: Any, threads: int) -> dict[str, Any]:
    """ONNX Runtime fp32, static int8 (QDQ, per-channel) and dynamic int8, or the error.

    The ONNX files live in a ``compactnn-ort-*`` temporary folder that each returned
    :class:`OrtModule` holds (its ``path`` stays valid: the deploy bench reopens it), removed
    once the last of them is garbage-collected; when no model is returned, at once.
    """
    scratch = Scratch("compactnn-ort-")
    tmp = scratch.path
    try:
        # ONNX Runtime's quantization tools drop uuid-named external-data files into the
        # current directory; run them from the temp folder so nothing leaks into the caller's.
        with contextlib.chdir(tmp):
            out = _ort_models(model, example, calib, threads, tmp)
        (tmp / "pre.onnx").unlink(missing_ok=True)  # an intermediate no model runs
    except BaseException:
        scratch.remove()
        raise
    held = [r.model for r in out.values() if isinstance(r, PeerResult)]
    for module in held:
        module.scratch = scratch  # the folder goes with the last model that runs its files
    if not held:
        scratch.remove()
    return out


def _ort_models(model: nn.Module, example: Any, calib: Any, threads: int, tmp: Path) -> dict:
    ortq = require("onnxruntime.quantization", "onnx")
    CalibrationDataReader, QuantFormat, QuantType = (
        ortq.CalibrationDataReader,
        ortq.QuantFormat,
        ortq.QuantType,
    )
    quantize_dynamic, quantize_static = ortq.quantize_dynamic, ortq.quantize_static

    hf = isinstance(example, dict)
    t0 = time.perf_counter()
    names = export_onnx(model, example, tmp / "fp32.onnx")
    export_s = time.perf_counter() - t0
    out: dict[str, Any] = {"ort-fp32": _ort(tmp / "fp32.onnx", export_s, threads, names, hf)}
    src = tmp / "fp32.onnx"
    try:  # shape inference and graph cleanup, as ONNX Runtime recommends before quantizing
        pre_process(src, tmp / "pre.onnx")
        src = tmp / "pre.onnx"
    except Exception:  # the raw export still quantizes; pre-processing is an optimisation
        pass
    batches = [_feed(b, names) for b in as_batches(calib)[:8]]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    jobs: dict[str, Callable[[Path], None]] = {
        "ort-static-int8": lambda p: quantize_static(
            str(src),
            str(p),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        ),
        "ort-dynamic-int8": lambda p: quantize_dynamic(
            str(src), str(p), weight_type=QuantType.QInt8
        ),
    }
    for name, job in jobs.items():
        try:
            t0 = time.perf_counter()
            with quiet_ort_quantize():  # the quantizer's advice, not a finding
                job(tmp / f"{name}.onnx")
            out[name] = _ort(tmp / f"{name}.onnx", time.perf_counter() - t0, threads, names, hf)
        except Exception as exc:  # a peer's failure is a finding, not a crash
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def pre_process(src: Path, dst: Path) -> None:
    """ONNX Runtime's ``quant_pre_process`` of ``src`` into ``dst``, run from a scratch folder
    beside ``dst`` that is deleted afterwards, whatever happens.

    When its symbolic shape inference is incomplete, ONNX Runtime saves
    ``sym_shape_infer_temp.onnx`` and an external-data file as large as the model (about
    90 MB for a small transformer) into the current directory, then raises: that litter goes
    with the scratch folder instead of staying in the caller's folder or the peer's.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).absolute(), Path(dst).absolute()
    with (
        tempfile.TemporaryDirectory(prefix="pre-", dir=dst.parent) as scratch,
        contextlib.chdir(scratch),
    ):
        quant_pre_process(str(src), str(dst))


def _feed(batch: Any, names: list[str]) -> dict:
    if isinstance(batch, dict):
        return {k: v.numpy() for k, v in batch.items() if k in names}
    batch = batch[0] if isinstance(batch, tuple) else batch
    return {names[0]: batch.numpy()}


def _ort(path: Path, build_s: float, threads: int, names: list[str], hf: bool) -> PeerResult:
    module = OrtModule(str(path), threads, names, hf)
    return PeerResult(module, os.path.getsize(path), build_s, "ONNX file")


def _saved_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` (how torchao/quanto models are saved)."""
    with tempfile.TemporaryDirectory(prefix="compactnn-peer-") as tmp:
        torch.save(model.state_dict(), Path(tmp) / "m.pt")
        return (Path(tmp) / "m.pt").stat().st_size


def _timed_copy(
    model: nn.Module, apply: Callable[[nn.Module], None], dtype: torch.dtype = torch.float32
) -> PeerResult:
    m = copy.deepcopy(model).eval().to(dtype)
    t0 = time.perf_counter()
    apply(m)
    build_s = time.perf_counter() - t0
    return PeerResult(m, _saved_bytes(m), build_s, "torch.save state_dict")


def torchao_models(model: nn.Module, group_size: int = 32, bf16: bool = False) -> dict[str, Any]:
    """torchao weight-only int8 and int4 (group ``group_size``), or the error message.

    With ``bf16`` each config also runs on a bfloat16 copy of the model (rows ``...-bf16``):
    torchao's weight-only kernels are meant for bfloat16 activations.
    """
    tq = require("torchao.quantization", "bench")
    per_group = require("torchao.quantization.granularity", "bench").PerGroup

    configs = {
        "torchao-int8wo": lambda: tq.Int8WeightOnlyConfig(),
        f"torchao-int4wo-g{group_size}": lambda: tq.Int4WeightOnlyConfig(group_size=group_size),
        f"torchao-intx4wo-g{group_size}": lambda: tq.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=per_group(group_size)
        ),
    }
    jobs = {k: (lambda m, c=c: tq.quantize_(m, c())) for k, c in configs.items()}
    return _run_each(jobs, model, bf16)


def quanto_models(model: nn.Module, bf16: bool = False) -> dict[str, Any]:
    """optimum-quanto weight-only qint8 and qint4 (frozen), or the error message; ``bf16``
    as in :func:`torchao_models`."""
    quanto = require("optimum.quanto", "bench")
    freeze, qint4, qint8, quantize = quanto.freeze, quanto.qint4, quanto.qint8, quanto.quantize

    def job(qtype: Any) -> Callable[[nn.Module], None]:
        def apply(m: nn.Module) -> None:
            quantize(m, weights=qtype)
            freeze(m)

        return apply

    return _run_each({"quanto-qint8": job(qint8), "quanto-qint4": job(qint4)}, model, bf16)


def _run_each(
    jobs: dict[str, Callable[[nn.Module], None]], model: nn.Module, bf16: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    variants = [("", torch.float32)] + ([("-bf16", torch.bfloat16)] if bf16 else [])
    for name, apply in jobs.items():
        for suffix, dtype in variants:
            try:
                out[name + suffix] = _timed_copy(model, apply, dtype)
            except Exception as exc:  # a peer's failure is a finding, not a crash
                out[name + suffix] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return out


def float_paths(
    model: nn.Module, example: Any, threads: int, *, with_compile: bool = True
) -> dict[str, Any]:
    """Float contenders for the speed baseline: eager, torch.compile (unless
    ``with_compile`` is False) and bf16 autocast; :func:`ort_models` adds ONNX Runtime fp32."""
    out: dict[str, Any] = {"fp32-eager": PeerResult(model, None, 0.0, "-")}
    if with_compile:
        out["torch.compile"] = _compiled(model, example)
    out["bf16-autocast"] = PeerResult(Bf16Autocast(model), None, 0.0, "-")
    return out


def _compiled(model: nn.Module, example: Any) -> PeerResult | str:
    from compactnn.core.calib import call_model

    try:
        t0 = time.perf_counter()
        compiled = torch.compile(model)
        with torch.no_grad():
            call_model(compiled, example)  # compilation happens on the first call
        return PeerResult(compiled, None, time.perf_counter() - t0, "-")
    except Exception as exc:  # report the failure as a finding
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def fx_x86_int8(model: nn.Module, calib: torch.Tensor) -> PeerResult:
    """PyTorch's FX graph-mode static int8 on the x86 engine (its own calibration on
    ``calib``): ``prepare_fx`` / ``convert_fx`` with the default x86 qconfig mapping."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the FX path is deprecated upstream; still a peer
        warnings.simplefilter("ignore")
        mapping = get_default_qconfig_mapping("x86")
        prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, (calib,))
        with torch.no_grad():
            prepared(calib)
        converted = convert_fx(prepared)
    return PeerResult(converted, _saved_bytes(converted), time.perf_counter() - t0, "state_dict")


def time_blocks(
    models: dict[str, Any],
    args: tuple,
    *,
    rounds: int = 3,
    block_s: float = 0.3,
    pause_s: float = 0.05,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds per call of each callable, timed in blocks.

    The protocol of shared/BENCHMARKING.md: every model is warmed up, then each runs a block
    of calls on its own after a short pause, in ``rounds`` rounds whose order rotates, so one
    runtime's spinning or waking threads never land inside another's timed call. A block
    holds as many calls as fit in about ``block_s`` seconds (3 to 30). Values that are not
    callable (a peer's error message) are skipped.

    Returns:
        ``(wall, cpu)``: model name -> seconds of each timed call.
    """
    live = {k: m for k, m in models.items() if callable(m)}
    calls: dict[str, int] = {}
    with torch.inference_mode():
        for k, m in live.items():
            for _ in range(2):
                m(*args)
            t0 = time.perf_counter()
            m(*args)
            calls[k] = int(min(30, max(3, block_s // max(time.perf_counter() - t0, 1e-6))))
        wall: dict[str, list[float]] = {k: [] for k in live}
        cpu: dict[str, list[float]] = {k: [] for k in live}
        names = list(live)
        for r in range(rounds):
            shift = r % max(len(names), 1)
            for k in names[shift:] + names[:shift]:
                time.sleep(pause_s)
                for _ in range(calls[k]):
                    c0, t0 = time.process_time(), time.perf_counter()
                    live[k](*args)
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
    return wall, cpu
