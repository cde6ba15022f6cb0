"""Benchmark section ``deploy``: int8 kernels against every int8 peer and float path.

torchvision ResNet-18, MobileNetV3-Small and MobileNetV2 (random weights; batch-norm
statistics set by training-mode passes so activations are not degenerate), at 224x224 and
64x64, batch 8 and batch 1: fp32 eager, ``torch.compile``, ONNX Runtime fp32, bf16 autocast,
ONNX Runtime's own static int8 (``quantize_static``, QDQ, per-channel), PyTorch's FX-mode x86
int8 (its own calibration), and ``compactnn.deploy`` of the ``w8a8`` model (oneDNN, both
residual modes, the ONNX Runtime backend, oneDNN on the model with quantized residuals, and
that graph run by the execution plan of :mod:`compactnn.deployment.runner`, and the ONNX
Runtime backend on ``quantize_residuals(grids="all")``; in a full run also that one and
``quantize_static``'s file in sessions whose threads spin). Every contender
is timed in its own block of calls after a pause, three rounds in rotating order
(:func:`compactnn.bench.peers.time_blocks`); ratios are to the fastest float path, and
compactnn's fastest int8 path is set against the fastest int8 peer under the same thread
policy and against the fastest int8 peer row of the table (spinning sessions included).
Then the reference CNNs: top-1 of the deployed model itself next to the simulated w8a8 model.

The timing runs in a child process started with ``OMP_WAIT_POLICY=PASSIVE`` (every OpenMP
path, float and int8 alike, then sleeps instead of spinning at barriers: on a machine shared
with other jobs the spinning threads otherwise steal the time slices the working thread
needs). A short table measured with the default policy follows, for comparison.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import warnings
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.bench.deploy_checks import ceiling, reference_accuracy, roofline
from compactnn.omp_policy import load_average, passive_policy_env

THREADS = 2
FLOAT_PATHS = ("fp32-eager", "torch.compile", "ort-fp32", "bf16-autocast")
INT8_PEERS = ("ort-static-int8", "torch-x86-int8 (FX)")
COMMAND = "python -m compactnn.bench --only deploy"
QRES = "compactnn int8 onednn, quantized residuals"
PLAN = "compactnn int8 onednn, quantized residuals, plan"
POLICY = "OMP_WAIT_POLICY"
PEER_INT8 = "ort-static-int8"
PEER_SPIN = "ort-static-int8, spinning"
ORT_ALL = "compactnn int8 ort, all adds quantized"
ORT_ALL_SPIN = "compactnn int8 ort, all adds quantized, spinning"
OURS = (PLAN, QRES, ORT_ALL)  # compactnn's int8 paths with the peers' thread policy
PEERS_ALL = (*INT8_PEERS, PEER_SPIN)  # every int8 peer row of the table
OURS_ALL = (*OURS, ORT_ALL_SPIN)  # ours with a spinning session too
# (model, input size): the full run; --quick times the 64x64 pair only
SHAPES_FULL = (
    ("resnet18", 224),
    ("resnet18", 64),
    ("mobilenet_v3_small", 224),
    ("mobilenet_v3_small", 64),
    ("mobilenet_v2", 224),
)
SHAPES_QUICK = (("resnet18", 64), ("mobilenet_v3_small", 64))
SHAPES_ENV = "COMPACTNN_BENCH_DEPLOY_SHAPES"  # e.g. "resnet18:224,mobilenet_v2:224"
# Random-weight networks amplify a one-code rounding difference from layer to layer (measured:
# ResNet-18 at 64x64, plain w8a8, 3.2 steps); the speed rows accept that gap, print it, and
# the reference CNNs below are verified at the default tolerance.
SPEED_TOLERANCE = 8.0


def _vision_model(name: str, size: int = 224) -> nn.Module:
    """A torchvision model with random weights and batch-norm statistics of its own inputs
    (cumulative averages over three training-mode passes), so no layer's output collapses."""
    torchvision = require("torchvision", "bench")

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def _contenders(
    model: nn.Module, calib: torch.Tensor, example: torch.Tensor, quick: bool
) -> tuple[dict, dict[str, float]]:
    """name -> callable model, or an error message (a peer failing is a finding); and the
    steps each compactnn simulation moves from itself (:func:`_compactnn_contenders`)."""
    from compactnn.bench.peers import OrtModule, PeerResult, float_paths, fx_x86_int8, ort_models

    out: dict[str, Any] = {}
    peers = {
        **float_paths(model, example, THREADS, with_compile=not quick),
        **ort_models(model, example, calib, THREADS),
    }
    for k, v in peers.items():
        if k != "ort-dynamic-int8":
            out[k] = v.model if isinstance(v, PeerResult) else v
    static = out.get(PEER_INT8)
    if not quick and not isinstance(static, str | None):  # the same file, threads spinning
        out[PEER_SPIN] = OrtModule(static.path, THREADS, static.input_names, False, spinning=True)
    try:
        out["torch-x86-int8 (FX)"] = fx_x86_int8(model, calib).model
    except Exception as e:
        out["torch-x86-int8 (FX)"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    labels = (QRES, PLAN, ORT_ALL) if quick else None
    ours, moves = _compactnn_contenders(model, calib, labels=labels)
    return out | ours, moves


def _compactnn_contenders(
    model: nn.Module, calib: torch.Tensor, labels=None
) -> tuple[dict, dict[str, float]]:
    """The compactnn deployments (label -> model or error message), and how many steps each
    simulation they come from moves under a 1e-6 nudge of its input."""
    import compactnn
    from compactnn.deployment import quantize_residuals
    from compactnn.lowering.probes import probes
    from compactnn.lowering.verify import INPUT_SCALE

    qmodel = compactnn.compress(model, "w8a8", calib_data=calib, progress=False)
    sims = {
        "w8a8": qmodel,
        "w8a8 + quantized residuals": quantize_residuals(qmodel, calib),
        "w8a8 + all adds quantized": quantize_residuals(qmodel, calib, grids="all", output=True),
    }
    wanted = [
        (label, sim, kw)
        for label, sim, kw in (
            ("compactnn int8 onednn", "w8a8", {"backend": "onednn", "residual": "exact"}),
            ("compactnn int8 onednn fast", "w8a8", {"backend": "onednn", "residual": "fast"}),
            ("compactnn int8 ort", "w8a8", {"backend": "onnxruntime"}),
            (QRES, "w8a8 + quantized residuals", {"backend": "onednn"}),
            (ORT_ALL, "w8a8 + all adds quantized", {"backend": "onnxruntime"}),
        )
        if labels is None or label in labels
    ]
    # how far each deployed simulation moves from itself when its input is scaled by 1 + 1e-6
    # (the published rule; probes.probes has finer probes too): a
    # random network that amplifies rounding flips gets a tolerance above its own movement
    moves = {
        sim: (probes(sims[sim], calib[:8]).get(INPUT_SCALE) or (0.0,))[0] for _, sim, _ in wanted
    }
    out: dict[str, Any] = {}
    for label, sim, kw in wanted:
        # grids="all" has ~3x more roundings: on random weights one-code flips compound
        # further (measured: MobileNetV3-Small 64x64, 13.5 steps); the gap is printed below
        tol = max(SPEED_TOLERANCE * (4 if label == ORT_ALL else 1), 2 * moves[sim])
        try:
            out[label] = compactnn.deploy(sims[sim], example=calib[:8], tolerance=tol, **kw)
        except Exception as e:
            out[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if (labels is None or PLAN in labels) and not isinstance(out.get(QRES), str | None):
        sim = sims["w8a8 + quantized residuals"]
        out[PLAN] = _planned(out[QRES], sim, calib[:8], out[QRES].verification.tolerance)
    if labels is None and not isinstance(out.get(ORT_ALL), str | None):
        out[ORT_ALL_SPIN] = _spinning(out[ORT_ALL])
    return out, moves


def _spinning(deployed: Any) -> Any:
    """The same ONNX Runtime deployment in a session whose idle threads spin."""
    from compactnn.deployment.api import DeployedModel
    from compactnn.export.ort import ort_callable

    run = ort_callable(deployed.onnx_bytes, THREADS, spinning=True)
    spin = DeployedModel(run, "onnxruntime", deployed.kept_float)
    spin.verification = deployed.verification  # same file, same kernels
    return spin


def _graph_lines(models: dict[str, Any]) -> list[str]:
    """Op counts of the graphs ONNX Runtime runs: ours (all adds quantized) and the peer's."""
    from compactnn.export.ort import optimized_graph

    rows = []
    for label, m in ((ORT_ALL, models.get(ORT_ALL)), (PEER_INT8, models.get(PEER_INT8))):
        source = getattr(m, "onnx_bytes", None) or getattr(m, "path", None)
        if source is None:
            continue
        counts: dict[str, int] = {}
        for node in optimized_graph(source).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        ops = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        rows.append(f"{label}: {ops}")
    if not rows:
        return []
    return ["Optimized ONNX Runtime graphs (node counts): " + "; ".join(rows) + ".", ""]


def _winner_line(models: dict[str, Any], timed: dict[int, tuple[dict, dict]]) -> list[str]:
    """The fastest int8 contender of each batch, compactnn's or a peer's."""
    parts = []
    for b, (wall, _cpu) in timed.items():
        ints = [k for k in wall if k not in FLOAT_PATHS and not isinstance(models.get(k), str)]
        if ints:
            best = min(ints, key=lambda k: statistics.median(wall[k]))
            parts.append(f"batch {b}: {best} ({statistics.median(wall[best]) * 1e3:.1f} ms)")
    return ["Fastest int8 contender: " + "; ".join(parts) + ".", ""] if parts else []


def _planned(deployed: Any, sim: nn.Module, example: torch.Tensor, tolerance: float) -> Any:
    """The deployed oneDNN graph run by the execution plan, verified against ``sim``."""
    from compactnn.deployment.api import DeployedModel
    from compactnn.deployment.runner import plan_runner
    from compactnn.lowering.verify import compare

    try:
        fast = DeployedModel(plan_runner(deployed.program), "onednn", deployed.kept_float)
        fast.verification = compare(sim, fast, example, "deploy[onednn, plan]", tolerance=tolerance)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not fast.verification.passed:
        return f"failed verification: {fast.verification}"
    return fast


def _table(
    name: str,
    models: dict[str, Any],
    timed: dict[int, tuple[dict, dict]],
    moves: dict[str, float] | None = None,
) -> list[str]:
    header = " | ".join(
        f"batch {b} ms | batch {b} ratio | batch {b} CPU ms | CPU ratio" for b in timed
    )
    lines = [
        f"**{name}** ({THREADS} threads; median wall ms, min-max when they spread > 10%; "
        "ratio = fastest float path / contender; CPU ms: median CPU time of the process per "
        "call, which time spent waiting for the machine's other jobs does not inflate)",
        "",
        f"| contender | {header} |",
        "|---|" + "---:|---:|---:|---:|" * len(timed),
    ]
    best, best_cpu = {}, {}
    for b, (wall, cpu) in timed.items():
        meds = {k: statistics.median(v) for k, v in wall.items()}
        best[b] = min((k for k in FLOAT_PATHS if k in meds), key=meds.get)
        cpus = {k: statistics.median(v) for k, v in cpu.items()}
        best_cpu[b] = min((k for k in FLOAT_PATHS if k in cpus), key=cpus.get)
    for k, m in models.items():
        if k.startswith("_"):  # the simulations' measured movement: not a contender
            continue
        if isinstance(m, str):
            lines.append(f"| {k} | failed: {m} |" + " |" * (4 * len(timed) - 1))
            continue
        cells = []
        for b, (wall, cpu) in timed.items():
            v = wall[k]
            med = statistics.median(v)
            cell = f"{med * 1e3:.1f}"
            if (max(v) - min(v)) / med > 0.10:
                cell += f" ({min(v) * 1e3:.0f}-{max(v) * 1e3:.0f})"
            base = statistics.median(wall[best[b]])
            c_med, c_base = statistics.median(cpu[k]), statistics.median(cpu[best_cpu[b]])
            cells += [cell, f"{base / med:.2f}x", f"{c_med * 1e3:.1f}", f"{c_base / c_med:.2f}x"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += _peer_lines(timed)
    lines += _winner_line(models, timed)
    lines += _graph_lines(models)
    lines.append(
        "Fastest float path: "
        + ", ".join(f"batch {b}: {best[b]} (by CPU time: {best_cpu[b]})" for b in timed)
        + ". "
        + _verification_line(models, moves or {})
    )
    return lines


def _ratio(times: dict[str, list], num: str, den: str) -> str:
    return f"{statistics.median(times[num]) / statistics.median(times[den]):.2f}x"


def _fastest_pair(
    timed: tuple[dict, dict], ours: tuple[str, ...], peers: tuple[str, ...]
) -> tuple[str, str] | None:
    """``"X wall, Y CPU (ours vs peer)"`` for the fastest of ``ours`` against the fastest of
    ``peers`` (their median time / ours), and our fastest path's label; None without both."""
    wall, cpu = timed
    ours_in, peers_in = [k for k in ours if k in wall], [k for k in peers if k in wall]
    if not ours_in or not peers_in:
        return None
    us = min(ours_in, key=lambda k: statistics.median(wall[k]))
    peer = min(peers_in, key=lambda k: statistics.median(wall[k]))
    text = (
        f"{_ratio(wall, peer, us)} wall, {_ratio(cpu, peer, us)} CPU "
        f"({us.removeprefix('compactnn int8 ')} vs {peer})"
    )
    return us, text


def _peer_lines(timed: dict[int, tuple[dict, dict]]) -> list[str]:
    """compactnn's fastest int8 path against the fastest int8 peer, and ONNX Runtime's own
    ``quantize_static`` model, per batch (their median time / ours: > 1 means we are faster).
    Two comparisons where the table has rows whose ONNX Runtime threads spin: under the same
    thread policy (no spinning session on either side), and against the fastest peer row of
    the whole table (spinning sessions on both sides), so no faster peer row goes unnamed."""
    same, every, static = [], [], []
    for b, pair in timed.items():
        found = _fastest_pair(pair, OURS, INT8_PEERS)
        if found is None:
            continue
        us, text = found
        same.append(f"batch {b}: {text}")
        wall = pair[0]
        if PEER_SPIN in wall or ORT_ALL_SPIN in wall:
            every.append(f"batch {b}: {_fastest_pair(pair, OURS_ALL, PEERS_ALL)[1]}")
        if PEER_INT8 in wall:
            static.append(f"batch {b}: {_ratio(wall, PEER_INT8, us)}")
    if not same:
        return []
    spin = (
        f"; against the fastest int8 peer row of the table (sessions whose threads spin "
        f"included, on both sides): {'; '.join(every)}"
        if every
        else ""
    )
    return [
        "compactnn's fastest int8 path against the fastest int8 peer (its time / ours; target "
        f">= 1.1x), under the same thread policy (no spinning session): {'; '.join(same)}{spin}. "
        f"Against ONNX Runtime `quantize_static`: {'; '.join(static)}.",
        "",
    ]


def _verification_line(models: dict[str, Any], moves: dict[str, float]) -> str:
    parts = [
        f"{k}: {m.verification.max_diff_steps:.2f} steps"
        for k, m in models.items()
        if k.startswith("compactnn") and not isinstance(m, str)
    ]
    moved = ", ".join(f"{k} {v:.1f}" for k, v in moves.items())
    return (
        "Max difference to the simulated model each was deployed from (batch of 8): "
        + "; ".join(parts)
        + "."
        + (
            f" Steps each simulation moves from itself when its input is scaled by 1 + 1e-6 "
            f"(the tolerance is at least twice this): {moved}."
            if moved
            else ""
        )
    )


def _measure(quick: bool) -> list[str]:
    """The main tables: every contender, every model and size, both batches (in the child)."""
    from compactnn.bench.peers import time_blocks
    from compactnn.measure.environment import cpu_description

    shapes = _shapes(quick)
    fastest: dict[str, float] = {}  # network -> our fastest batch-8 ms at 224x224
    out = [
        f"`{_command(quick)}` on {cpu_description()} (threads: "
        f"{torch.get_num_threads()}, {POLICY}={os.environ.get(POLICY, 'unset')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}; each contender "
        "timed in its own block of calls after a 50 ms pause, 3 rounds in rotating order; "
        f"load average at start: {_load()}"
        + ("; --quick leaves out torch.compile and the other compactnn variants" if quick else "")
        + f"). Random weights: the compactnn rows are deployed with tolerance={SPEED_TOLERANCE:g} "
        "steps, or twice the steps the simulation moves from itself under a 1e-6 nudge of its "
        "input where that is more (random networks amplify rounding flips; the gap each has "
        "is listed under its table); the reference CNNs at the end are verified at the "
        "default tolerance.",
        "",
    ]
    for name, size in shapes:
        torch.manual_seed(0)
        model = _vision_model(name, size)
        calib = torch.randn(16, 3, size, size)
        models, moves = _contenders(model, calib, calib[:8], quick)
        timed = {b: time_blocks(models, (calib[:b],)) for b in (8, 1)}
        title = f"torchvision {name}, {size}x{size}"
        table = _table(title, models, timed, moves)
        out += [*table, "", f"Load average after it: {_load()}.", ""]
        ours = [k for k in timed[8][0] if k.startswith("compactnn") and callable(models.get(k))]
        if size == 224 and ours:
            fastest[name] = min(statistics.median(timed[8][0][k]) for k in ours) * 1e3
    return [*out, *roofline(THREADS, fastest), ""]


def _command(quick: bool) -> str:
    spec = os.environ.get(SHAPES_ENV, "").strip()
    prefix = f"{SHAPES_ENV}={spec} " if spec else ""
    return f"{prefix}{COMMAND}{' --quick' if quick else ''}"


def _shapes(quick: bool) -> tuple[tuple[str, int], ...]:
    """The (model, size) pairs to time: ``$COMPACTNN_BENCH_DEPLOY_SHAPES`` when set."""
    spec = os.environ.get(SHAPES_ENV, "").strip()
    if not spec:
        return SHAPES_QUICK if quick else SHAPES_FULL
    pairs = [item.split(":") for item in spec.split(",") if item.strip()]
    return tuple((name.strip(), int(size)) for name, size in pairs)


def _default_policy(quick: bool) -> list[str]:
    """ResNet-18 batch 8 again in this process, where OpenMP threads spin (the default)."""
    from compactnn.bench.peers import PeerResult, float_paths, ort_models, time_blocks

    torch.manual_seed(0)
    model = _vision_model("resnet18")
    calib = torch.randn(16, 3, 224, 224)
    peers = {
        **float_paths(model, calib[:8], THREADS, with_compile=False),
        **ort_models(model, calib[:8], calib, THREADS),
    }
    models = {k: v.model for k, v in peers.items() if isinstance(v, PeerResult)}
    models.pop("ort-dynamic-int8", None)
    ours, moves = _compactnn_contenders(model, calib, labels=(QRES, PLAN))
    models.update(ours)
    timed = {8: time_blocks(models, (calib[:8],))}
    title = f"torchvision resnet18, 224x224, {POLICY} unset (OpenMP default: spinning)"
    return [*_table(title, models, timed, moves), "", f"Load average: {_load()}."]


def _load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def _child(quick: bool, module: str = "compactnn.bench.deploy") -> str:
    """``module.timing_text(quick)`` run in a child process with the passive OpenMP wait the
    ``compactnn`` command uses (with its bounded spin where the machine's load leaves room:
    without it, measured on ResNet-18 64x64 batch 1, the oneDNN deployment ran 1.79 ms
    instead of 0.73 ms, 0.60x ONNX Runtime's ``quantize_static`` instead of 1.15x)."""
    code = f"import sys; from {module} import timing_text; sys.stdout.write(timing_text({quick}))"
    env = {**os.environ, **passive_policy_env(dict(os.environ), load_average(), os.cpu_count())}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"the timing child process failed: {done.stderr[-2000:]}")
    return done.stdout


def timing_text(quick: bool = False) -> str:
    """The timing tables alone (what the PASSIVE-policy child prints)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    return "\n".join(_measure(quick)) + "\n"


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown: the timing tables (in this process when
    ``OMP_WAIT_POLICY=PASSIVE`` is already set, else in a child that has it), then, in a
    full run, the same ResNet-18 with the default spinning policy and the GEMM ceiling, then
    the reference CNNs' accuracy."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    passive = os.environ.get(POLICY, "").upper() == "PASSIVE"
    timing = timing_text(quick) if passive else _child(quick)
    out = ["## Deployment: int8 kernels on CPU", "", timing.rstrip(), ""]
    if not quick:  # the spinning-policy comparison and the GEMM ceiling: full run only
        if not passive:  # this process spins at barriers (OpenMP's default)
            out += [*_default_policy(quick), ""]
        out += [*ceiling(), ""]
    out += reference_accuracy()
    return "\n".join(out) + "\n"
