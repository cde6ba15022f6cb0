"""Scale: streamed GPTQ of a random Llama under a memory budget (docs/scale.md).

Each run is its own Python process so the parent's memory does not count: the whole-model
run (``from_pretrained`` then ``compress`` and ``save``), the streamed run under
``max_memory``, and a streamed run killed (SIGKILL) after half of the blocks and then
restarted. Reported: wall time, peak resident memory (``ru_maxrss`` of the child: the
interpreter and libraries included) and the run's own peak above its starting point (what
``max_memory`` bounds), and whether the artifacts are byte-identical (every file, the
header and its digest included).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = "w4-g128-gptq"
# (hidden, intermediate, layers, vocab, budget): full ~1.5 GB of float32 shards, quick ~0.12 GB
FULL = (1024, 2816, 28, 8192, "512MiB")
QUICK = (512, 1408, 8, 4096, "192MiB")  # exercises the path; below 3x
_MARK = "SCALE_RESULT "


def make_model(path: Path, hidden: int, inter: int, layers: int, vocab: int) -> int:
    """Save a random float32 Llama in 200 MB shards; returns the bytes of its shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=vocab,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="200MB")
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _ids(vocab: int):
    import torch

    return torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(1))


def _child(args: dict) -> None:
    """Run one contender in this (fresh) process; print its result as one JSON line."""
    import resource

    import torch

    torch.set_num_threads(int(args["threads"]))
    import compactnn

    ids = _ids(args["vocab"])
    t0 = time.perf_counter()
    result: dict = {}
    if args["kind"] == "whole":
        from transformers import LlamaForCausalLM

        from compactnn.core.provenance import record_source

        model = LlamaForCausalLM.from_pretrained(args["model"])
        qmodel = compactnn.compress(model, RECIPE, calib_data=ids, progress=False)
        from compactnn.streaming.shards import ShardSet

        # the record a streamed run adds (docs/scale.md): the artifacts can be byte-identical
        record_source(qmodel._compactnn.setdefault("extra", {}), ShardSet(args["model"]).source())
        compactnn.save(qmodel, args["out"])
    else:
        from compactnn.api import _compress
        from compactnn.streaming import compress_streamed, memory

        kill_after, stop_after = args.get("kill_after"), args.get("stop_after")
        start: list[int] = []
        reset = memory.reset_peak

        def reset_and_note() -> bool:  # the run's baseline is the RSS where its peak restarts
            start.append(memory.rss())
            return reset()

        memory.reset_peak = reset_and_note

        def on_block(i: int) -> None:
            if kill_after is not None and i == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup runs
            if stop_after is not None and i == stop_after:  # a memory probe of the first blocks
                added = (memory.peak_rss() - start[0]) / memory.MIB
                out = {"added_peak_mib": round(added, 1), "blocks_done": i + 1}
                out["seconds"] = round(time.perf_counter() - t0, 1)
                print(_MARK + json.dumps(out), flush=True)
                os._exit(0)

        report = compress_streamed(
            args["model"],
            RECIPE,
            ids,
            max_memory=args["budget"],
            out=args["out"],
            compress_model=_compress,
            progress=False,
            on_block=on_block,
        )
        result.update(
            added_peak_mib=report.added_peak_mib,
            baseline_mib=report.baseline_mib,
            estimate_mib=report.estimate_mib,
            resumed_from=report.resumed_from,
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(_MARK + json.dumps(result), flush=True)


def _spawn(args: dict) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    code = (
        "import json,sys; from compactnn.bench.scale import _child; _child(json.loads(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    return {"returncode": proc.returncode, "stderr": proc.stderr[-400:]}


QAT_SCRIPT = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import compactnn
from compactnn.data.mnist import load_mnist
from compactnn.models import load_reference
ref = load_reference("mnist-cnn", progress=False)
t0 = time.perf_counter()
q = compactnn.train(ref.model, "w4a4-lsq", load_mnist(), epochs=int(sys.argv[1]), progress=False)
seconds = time.perf_counter() - t0
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    print("SCALE_RESULT " + json.dumps({"seconds": round(seconds, 1),
          "top1": round(ref.evaluate(q), 2)}), flush=True)
"""


def spawn_ranks(world: int, argv: list[str]) -> list[tuple[int, str]]:
    """Run ``python -c *argv`` as ``world`` processes of a torchrun environment (gloo on
    this host; one process without it); returns each rank's (exit code, stdout)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        if world > 1:
            env |= {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
            env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-c", *argv]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outputs = []
    for p in procs:
        text, _ = p.communicate()  # read before waiting: a full pipe would block the child
        outputs.append((p.returncode, text))
    return outputs


def marked(text: str, mark: str) -> dict:
    """The JSON of the last line of ``text`` that starts with ``mark`` ({} when none)."""
    result: dict = {}
    for line in text.splitlines():
        if line.startswith(mark):
            result = json.loads(line[len(mark) :])
    return result


def qat_run(world: int, epochs: int) -> dict:
    """``w4a4-lsq`` on mnist-cnn in ``world`` processes (a torchrun environment, gloo)."""
    result: dict = {}
    for _, out in spawn_ranks(world, [QAT_SCRIPT, str(epochs)]):
        result = marked(out, _MARK) or result
    return result


def qat_section(quick: bool) -> str:
    """Markdown rows: single process against two gloo processes, same global batch."""
    epochs = 1 if quick else 4
    single, double = qat_run(1, epochs), qat_run(2, epochs)
    rows = [
        f"## Distributed QAT: `w4a4-lsq` on mnist-cnn, {epochs} epoch(s), seed 0",
        "",
        "Same recipe, seed and global batch; 1 torch thread per process; gloo on CPU.",
        "",
        "| processes | top-1 % | wall s |",
        "|---|---|---|",
        f"| 1 | {single.get('top1', '-')} | {single.get('seconds', '-')} |",
        f"| 2 (torchrun environment) | {double.get('top1', '-')} | {double.get('seconds', '-')} |",
    ]
    if "top1" in single and "top1" in double:
        gap = abs(single["top1"] - double["top1"])
        rows += ["", f"Top-1 difference {gap:.2f} points (target <= 0.3): "
                 f"{'met' if gap <= 0.3 else '**not met**'}."]  # fmt: skip
    return "\n".join(rows) + "\n"


def same_artifact(a: Path, b: Path) -> bool:
    """Every file byte-identical, the header and its digest included."""
    names = ("model.safetensors", "recipe.yaml", "compactnn.json")
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def first_blocks(model: str, vocab: int, budget: str, blocks: int, runs: int) -> list[dict]:
    """The added peak of ``runs`` fresh streamed runs stopped after ``blocks`` blocks (the
    peak of a run is set by its first block or two: a quick check of its stability)."""
    out = []
    for _ in range(runs):
        root = Path(tempfile.mkdtemp(prefix="compactnn-scale-probe-"))
        try:
            args = {"model": model, "vocab": vocab, "budget": budget, "threads": 1}
            args |= {"kind": "stream", "out": str(root / "a"), "stop_after": blocks - 1}
            out.append(_spawn(args))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


def run(quick: bool = False) -> str:
    """Markdown: the streamed runs against the whole-model run (see the module docstring)."""
    hidden, inter, layers, vocab, budget = QUICK if quick else FULL
    threads = 1
    root = Path(tempfile.mkdtemp(prefix="compactnn-scale-"))
    try:
        model = root / "llama"
        shard_bytes = make_model(model, hidden, inter, layers, vocab)
        base = {"model": str(model), "vocab": vocab, "budget": budget, "threads": threads}
        whole = _spawn({**base, "kind": "whole", "out": str(root / "whole")})
        streamed = _spawn({**base, "kind": "stream", "out": str(root / "stream")})
        killed = _spawn({**base, "kind": "stream", "out": str(root / "resume"),
                         "kill_after": layers // 2 - 1})  # fmt: skip
        resumed = _spawn({**base, "kind": "stream", "out": str(root / "resume")})
        probes = first_blocks(str(model), vocab, budget, 2, 1 if quick else 3)
        same = same_artifact(root / "whole", root / "stream")
        same_resumed = same_artifact(root / "whole", root / "resume")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [
        f"## Scale: streamed `{RECIPE}` under `max_memory={budget}`",
        "",
        f"Random Llama (hidden {hidden}, MLP {inter}, {layers} blocks, vocab {vocab}): "
        f"{shard_bytes / 2**20:.0f} MiB of float32 shards; calibration 8 x 128 tokens; "
        f"{threads} thread, each run in a fresh process (`OMP_WAIT_POLICY=PASSIVE`); load "
        f"average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| run | wall s | peak RSS of the process (MiB) | run's own peak above its start (MiB) |",
        "|---|---|---|---|",
    ]
    for name, r in (
        ("whole model (from_pretrained + compress + save)", whole),
        ("streamed", streamed),
        ("streamed, killed after half the blocks", killed),
        ("streamed, restarted (resumes)", resumed),
    ):
        lines.append(
            f"| {name} | {r.get('seconds', '-')} | {r.get('maxrss_mib', '-')} | "
            f"{r.get('added_peak_mib', '-')} |"
        )
    lines += [
        "",
        f"Estimate checked against the budget: {streamed.get('estimate_mib')} MiB; process "
        f"baseline of the streamed run {streamed.get('baseline_mib')} MiB. The killed run "
        f"printed nothing (SIGKILL); the restart resumed from block "
        f"{resumed.get('resumed_from')}.",
        f"Streamed artifact identical to the whole-model one: **{same}**; after kill and "
        f"resume: **{same_resumed}**.",
        "",
        "Added peak of fresh streamed runs stopped after 2 blocks (the peak is set by the "
        "first blocks), MiB: " + ", ".join(str(p.get("added_peak_mib", "-")) for p in probes) + ".",
    ]
    return "\n".join(lines) + "\n\n" + qat_section(quick)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
