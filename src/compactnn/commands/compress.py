"""``compactnn compress MODEL --recipe R [--data D] [--out DIR] [--force]``."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.api import PROBE_PROJECTIONS, probe_pruned_layers
from compactnn.commands._common import (
    add_model_args,
    calib_inputs,
    check_data_given,
    check_out,
    cli_words,
    human_bytes,
    load_model,
    model_words,
    source_record,
    split_labels,
)
from compactnn.core.calib import as_batches, batch_size_of, call_model, check_token_ids
from compactnn.errors import CompactnnError
from compactnn.measure.size import artifact_bytes, float_artifact_bytes
from compactnn.model_io import LoadedModel, resolve_data
from compactnn.prune.probe import EXTRA_KEY as PROBE_KEY
from compactnn.prune.probe import ProbePruneConfig, probe_flops_fraction
from compactnn.prune.stats import count_params, layer_macs
from compactnn.training.data import labelled_keys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compress",
        help="compress a model with a recipe and save a packed artifact",
        description="Compress MODEL with recipe R and save the packed artifact in --out.",
    )
    p.add_argument("model", metavar="MODEL", help="reference name, HF dir, .pt2, or pkg.mod:fn")
    p.add_argument("--recipe", "-r", required=True, help="short name (w4a8) or recipe YAML file")
    p.add_argument(
        "--data",
        "-d",
        help=".safetensors/.npy inputs, a reference data set name, or 'data-free' (calibrate "
        "on images generated from the model's batch-norm statistics; docs/data-free.md)",
    )
    p.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="input shape of the generated images with --data data-free (default: the "
        "reference model's)",
    )
    p.add_argument("--out", "-o", help="artifact directory (default: out/<model>-<recipe>)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact in --out")
    p.add_argument(
        "--ignore",
        metavar="NAME",
        action="append",
        default=[],
        help="leave this layer (module name or fnmatch pattern, e.g. conv1 or 'head.*') "
        "untouched by every step; repeat for more",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for stochastic methods")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="stream a Hugging Face directory of safetensors shards block by block within "
        "SIZE (e.g. 512MiB) of memory; resumes an interrupted run (docs/scale.md)",
    )
    add_model_args(p)
    return p


def default_out(model: str, recipe: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.split(":")[-1]).stem or model)
    return Path("out") / f"{stem}-{Path(recipe).stem}"


def human_count(n: float) -> str:
    """``1234567`` -> ``"1.2M"``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def pruning_lines(pruning: dict) -> list[str]:
    """One line per pruning step that recorded its counts (``prune/stats.py``).

    Example:
        >>> counts = {"before": 1_200_000, "after": 800_000}
        >>> stats = {"params": counts, "nonzero": counts, "macs": counts}
        >>> pruning_lines({"channel": stats})[0].endswith("800.0k (whole first calibration batch)")
        True
    """
    lines = []
    for method, stats in pruning.items():
        if not isinstance(stats, dict) or not isinstance(stats.get("params"), dict):
            continue  # no calibration batch: nothing counted
        p, nz, macs = stats["params"], stats["nonzero"], stats["macs"]
        line = f"  pruning ({method}): params {human_count(p['before'])} -> "
        line += human_count(p["after"])
        if nz["after"] != p["after"]:  # unstructured: same tensors, fewer non-zeros
            line += f" ({human_count(nz['after'])} non-zero)"
        line += f", MACs {human_count(macs['before'])} -> {human_count(macs['after'])}"
        line += " (whole first calibration batch)"  # prune.stats.model_counts: not per sample
        lines.append(line)
    return lines


def pruned_layers(extra: dict, original=None) -> dict[str, str]:
    """What each pruning step did to each layer it pruned: its sparsity (unstructured, N:M)
    or its removed output channels (structured, read from the ``resized`` record).

    Example:
        >>> pruned_layers({"pruning": {"nm": {"fc": 0.5, "params": {}}}})
        {'fc': '50% of weights zero'}
    """
    out: dict[str, str] = {}
    for stats in extra.get("pruning", {}).values():
        if isinstance(stats, dict):
            for name, value in stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[name] = f"{value:.0%} of weights zero"
    modules = dict(original.named_modules()) if original is not None else {}
    for name, shape in extra.get("resized", {}).items():
        field = {"Conv1d": "out_channels", "Conv2d": "out_channels", "Linear": "out_features"}
        key = field.get(shape.get("kind")) if isinstance(shape, dict) else None
        if key is None or name in out:
            continue
        before = getattr(modules.get(name), key, None)
        after = shape.get(key)
        if isinstance(before, int) and isinstance(after, int) and after < before:
            out[name] = f"{before - after} of {before} output channels removed"
        elif before is None:
            out[name] = f"{after} output channels kept"
    return out


PROBE_CHOICE = {  # config.mode -> (kind, how each input's channels are chosen)
    "sample": ("dynamic", "chosen per sample by a probe"),
    "batch": ("dynamic", "chosen per batch by a probe"),
    "static": ("static", "the same for every batch, from the calibration statistics"),
}


def skipped_channels(width: int, ratio: float) -> int:
    """Hidden channels a probe-pruned MLP of ``width`` skips per input: ``floor(ratio *
    width)``, at most ``width - 1`` (``prune.probe.kept_channels``).

    Example:
        >>> skipped_channels(512, 0.3), skipped_channels(2, 0.9)
        (153, 1)
    """
    return min(math.floor(ratio * width), width - 1)


def _probe_record(extra: dict, original=None) -> tuple[dict, dict[str, int]] | None:
    """Probe pruning's config and each wrapped MLP's hidden width (None without it; a width
    of 0 when ``original`` does not say)."""
    record = extra.get(PROBE_KEY)
    if not isinstance(record, dict) or not record.get("mlps"):
        return None
    modules = dict(original.named_modules()) if original is not None else {}
    widths = {
        mlp: getattr(modules.get(f"{mlp}.down_proj"), "in_features", 0) for mlp in record["mlps"]
    }
    return record.get("config", {}), widths


def probe_layers(extra: dict, original=None) -> dict[str, str]:
    """What probe pruning does to each projection of the MLPs it wraps: how many of the
    MLP's hidden channels each input skips, chosen how; the weights stay whole (sliced at
    run time).

    Example:
        >>> cfg = {"ratio": 0.3, "mode": "sample"}
        >>> probe_layers({"probe_prune": {"config": cfg, "mlps": ["mlp"]}})["mlp.up_proj"][:40]
        'probe-pruned (dynamic: 30% of the MLP hi'
    """
    found = _probe_record(extra, original)
    if found is None:
        return {}
    config, widths = found
    ratio = config.get("ratio", 0.0)
    kind, how = PROBE_CHOICE.get(config.get("mode"), ("dynamic", "chosen by a probe"))
    out = {}
    for name in probe_pruned_layers(extra):
        width = widths.get(name.rpartition(".")[0], 0)
        share = f"{ratio:.0%} of the MLP hidden channels"
        if width:
            share = f"{skipped_channels(width, ratio)} of the MLP's {width} hidden channels"
        out[name] = f"probe-pruned ({kind}: {share} skipped, {how})"
    return out


def probe_macs(dense: int, mlps: list[tuple[int, float]], probe: float) -> int:
    """Multiply-accumulates of one call after probe pruning: the dense model's ``dense``,
    in which each probed MLP's ``(macs, kept)`` shrinks to its ``kept`` share of hidden
    channels and adds the probe's ``probe`` share of its dense MACs
    (``prune.probe.probe_flops_fraction``).

    Example:
        >>> probe_macs(1000, [(300, 0.7), (300, 0.7)], 0.1)
        880
    """
    return round(dense + sum(macs * (kept - 1.0 + probe) for macs, kept in mlps))


def probe_lines(extra: dict, original, batch: Any) -> list[str]:
    """Probe pruning's parameters and multiply-accumulates before and after on ``batch``
    (the first calibration batch; the float model runs on it once, its Linear / Conv MACs
    counted as ``prune.stats.count_macs`` does): the parameters stay (each input picks its
    channels, weights sliced at run time), the MLPs' products shrink, the probe adds its own.
    """
    found = _probe_record(extra, original)
    if found is None or batch is None:
        return []
    config = ProbePruneConfig.from_dict(found[0], "probe_prune.config")
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    layers = {n: m for n, m in original.named_modules() if isinstance(m, kinds)}
    was = original.training
    original.eval()
    try:
        macs = layer_macs(original, layers, lambda m: call_model(m, batch), per_sample=False)
    finally:
        original.train(was)
    ids = batch.get("input_ids", next(iter(batch.values()))) if isinstance(batch, dict) else batch
    ids = ids[0] if isinstance(ids, (tuple, list)) else ids
    rows, length = batch_size_of(batch), int(ids.shape[1]) if ids.dim() > 1 else 1
    probe = probe_flops_fraction(config, rows, length)
    mlps = [
        (
            sum(macs.get(f"{mlp}.{p}", 0) for p in PROBE_PROJECTIONS),
            1.0 - (skipped_channels(width, config.ratio) / width if width else config.ratio),
        )
        for mlp, width in found[1].items()
    ]
    dense = sum(macs.values())
    params = human_count(count_params(original))
    cost = f"; the probe adds {probe:.1%} of their dense MACs" if probe else ""
    return [
        f"  pruning (probe): params {params} -> {params} (weights kept whole, sliced at run "
        f"time), MACs {human_count(dense)} -> {human_count(probe_macs(dense, mlps, probe))} "
        f"({len(mlps)} MLPs skip {config.ratio:.0%} of their hidden channels{cost}; first "
        f"calibration batch, {rows} x {length})"
    ]


def data_free(args: argparse.Namespace, loaded) -> object:
    """256 images generated from the model alone (batch-norm statistics inversion)."""
    from compactnn.datafree import generate
    from compactnn.datafree.common import has_bn_stats

    if not has_bn_stats(loaded.model):  # before --input-shape: that would not help
        shape = args.input_shape or "C, H, W"
        raise CompactnnError(
            f"--data data-free matches the batch-norm statistics of MODEL, and "
            f"{type(loaded.model).__name__} has no BatchNorm layer with running statistics. "
            "Pass real inputs with --data FILE (.safetensors or .npy), or generate DAFL "
            "inputs (a generator trained against the model; the command line has no DAFL "
            "option) in Python and pass the file: data = compactnn.datafree.generate(model, "
            f"256, input_shape=({shape}), method='dafl'); "
            "safetensors.torch.save_file({'x': data.x}, 'dafl.safetensors'); then "
            "--data dafl.safetensors."
        )
    if args.input_shape:
        try:
            shape = tuple(int(s) for s in args.input_shape.split(","))
        except ValueError:
            raise CompactnnError(
                f"--input-shape {args.input_shape!r}: give C,H,W as integers, e.g. 1,28,28."
            ) from None
    elif loaded.calib is not None:
        first = loaded.calib if hasattr(loaded.calib, "shape") else next(iter(loaded.calib))
        first = first[0] if isinstance(first, (tuple, list)) else first  # (inputs, labels)
        shape = tuple(first.shape[1:])
    else:
        raise CompactnnError("--data data-free needs --input-shape C,H,W for this model.")
    data = generate(
        loaded.model, 256, input_shape=shape, seed=args.seed, progress=not args.no_progress
    )
    print(f"generated 256 calibration images in {data.cost['seconds']:.1f} s (data-free)")
    return data


def eval_command(out: Path, args: argparse.Namespace, loaded: LoadedModel) -> str:
    """The ``compactnn eval`` line that works for this artifact: only a reference model is
    rebuilt from the artifact's record; any other MODEL is named again (with its data).

    Example:
        >>> ns = argparse.Namespace(model="hf", weights=None, trust_pickle=False, data="d.npy")
        >>> eval_command(Path("art"), ns, LoadedModel(None, "hf"))
        'compactnn eval art --model hf --data d.npy'
    """
    words = ["compactnn", "eval", str(out)]
    if loaded.reference is None:
        words += ["--model", args.model]
    return shlex.join(words + model_words(args, loaded))


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_out(args.model, args.recipe)
    check_out(out, args.model, args.force)  # a file, /proc, an artifact, a model: before work
    recipe = compactnn.resolve_recipe(args.recipe)  # fail fast on a bad recipe
    check_input_shape(args)
    if args.max_memory is not None:
        return run_streamed(args, out, recipe)
    check_data_given(recipe, args.data, args.model)  # before loading the model
    note_training_recipe(recipe, args.model, args.recipe)
    loaded = load_model(args.model, args)
    if args.data == "data-free" and not reads_data(recipe):
        print(
            f"note: no step of {recipe.name} calibrates on data: no images generated for "
            "--data data-free",
            file=sys.stderr,
        )
        given, data = None, None
    elif args.data == "data-free":
        given, data = None, data_free(args, loaded)
    else:
        given = resolve_data(args.data, loaded)  # read once: calibration and the eval line
        data = split_labels(given, role="train")[0]  # a file's x (x_train), as calib_inputs
        if args.data is not None:  # ids the model cannot take: said before any work
            check_token_ids(loaded.model, data, f"--data {args.data}")
    t0 = time.perf_counter()
    try:
        qmodel = compactnn.compress(
            loaded.model,
            recipe,
            calib_data=data,
            seed=args.seed,
            progress=not args.no_progress,
            ignore=args.ignore,
        )
    except CompactnnError as exc:
        raise cli_words(exc, args.data) from None
    seconds = time.perf_counter() - t0
    extra = qmodel._compactnn.setdefault("extra", {})
    extra["source"] = source_record(loaded)
    extra.update(loaded.extra)
    digest = compactnn.save(qmodel, out, force=args.force)
    size, float_size = artifact_bytes(out), float_artifact_bytes(loaded.model)
    info = compactnn.info_of(qmodel)
    quantized = sum(1 for m in qmodel.modules() if hasattr(m, "weight_codes"))  # layers
    print(f"compressed {args.model} with {recipe.name} in {seconds:.1f} s")
    pruned = pruned_layers(extra, loaded.model)
    probed = probe_layers(extra, loaded.model)
    counts = f"  quantized layers: {quantized}; "
    counts += f"pruned layers: {len(pruned) + len(probed)}; " if pruned or probed else ""
    print(counts + f"kept in float: {len(info['float_layers'])}")
    for name, reason in info["float_layers"].items():
        if name in pruned:  # pruned by the recipe, not quantized: targeted after all
            reason = f"pruned ({pruned[name]}), weights in float"
        print(f"    {name}: {reason}")
    codes = {n for n, m in qmodel.named_modules() if hasattr(m, "weight_codes")}
    for name, what in pruned.items():
        if name not in info["float_layers"]:
            print(f"    {name}: pruned ({what})" + (", then quantized" if name in codes else ""))
    for name, what in probed.items():
        print(f"    {name}: {what}" + ("; its weights quantized" if name in codes else ""))
    for line in pruning_lines(extra.get("pruning", {})):
        print(line)
    calib = as_batches(data) if probed and data is not None else []
    for line in probe_lines(extra, loaded.model, calib[0] if calib else None):
        print(line)
    print(
        f"  artifact: {out}  {human_bytes(size)} "
        f"(float artifact {human_bytes(float_size)}, {float_size / size:.2f}x smaller)"
    )
    print(f"  sha256 digest: {digest}  (pin it: compactnn.load(..., expect_sha256=...))")
    held_out = argparse.Namespace(**{**vars(args), "data": eval_data_file(args, loaded, given)})
    print(f"  evaluate it: {eval_command(out, held_out, loaded)}")
    return 0


def reads_data(recipe) -> bool:
    """Whether a step of ``recipe`` reads calibration data (``MethodConfig.uses_data``:
    activation grids, GPTQ, Wanda, self-distilling pruning, FFN's refit...). A weight-only
    RTN recipe reads none.

    Example:
        >>> [reads_data(compactnn.resolve_recipe(r)) for r in ("w4", "w4a8", "sp90-dns")]
        [False, True, True]
    """
    return any(step.config.uses_data() for step in recipe.steps)


def check_input_shape(args: argparse.Namespace) -> None:
    """Refuse ``--input-shape`` without ``--data data-free``: only generated images take it
    (a data file's inputs have their own shape), and a silently unused option misleads."""
    if args.input_shape is not None and args.data != "data-free":
        given = f"--data {args.data} (inputs of their own shape)" if args.data else "no --data"
        raise CompactnnError(
            f"--input-shape {args.input_shape} sets the shape of the images --data data-free "
            f"generates, and this run has {given}: drop --input-shape, or pass --data data-free."
        )


def eval_data_file(args: argparse.Namespace, loaded: LoadedModel, data: Any) -> str | None:
    """What the printed ``compactnn eval`` line passes as ``--data``: never the calibration
    data. A ``--data`` file that also holds a held-out split (``x_test``/``y_test``, which
    ``eval`` reads; ``data`` is what the file held, read once for calibration); else
    ``HELD_OUT_FILE`` for the user to fill in; None for a reference model (``eval`` scores
    it on its own test split) or a model that brings its own sample input (a Hugging Face
    folder). A user's model compressed without a data file (data-free, or a weight-only
    recipe) needs one too: without it ``eval`` has no sample input."""
    if args.data is None or args.data == "data-free":
        own = loaded.reference is not None or loaded.example is not None or "hf" in loaded.extra
        return None if own else "HELD_OUT_FILE"
    if isinstance(data, dict):
        tensors = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
        if labelled_keys(tensors, "eval") == ("x_test", "y_test"):
            return args.data
    return None if loaded.reference is not None else "HELD_OUT_FILE"


def note_training_recipe(recipe, model: str, recipe_arg: str) -> None:
    """A training-aware recipe compresses here without its training (the post-training
    form of its quantizers, calibrated): say so and name the command that trains it. A
    method that trains inside compress (TernaryBERT's label-free distillation on the
    calibration text) is not noted: ``compactnn train`` takes classifiers only."""
    from compactnn.engines.qat import QATConfig
    from compactnn.quant.ternarybert import TernaryBERTConfig

    untrained = [
        step
        for step in recipe.steps
        if isinstance(step.config, QATConfig) and not isinstance(step.config, TernaryBERTConfig)
    ]
    if untrained:
        print(
            f"note: {recipe.name} is a training-aware recipe; compress calibrates it without "
            "training (its post-training accuracy). Train it with: compactnn train "
            f"{model} --recipe {recipe_arg} --data TRAIN_DATA",
            file=sys.stderr,
        )


def run_streamed(args: argparse.Namespace, out: Path, recipe) -> int:
    """``--max-memory``: the model directory streamed block by block (docs/scale.md)."""
    if args.data is None:
        raise compactnn.CompactnnError(
            "--max-memory needs --data (token ids as .safetensors or .npy): the model is "
            "never loaded whole, so no default calibration text is taken from it."
        )
    t0 = time.perf_counter()
    report = compactnn.compress(
        args.model,
        recipe,
        calib_data=calib_inputs(args.data),
        seed=args.seed,
        progress=not args.no_progress,
        ignore=args.ignore,
        max_memory=args.max_memory,
        out=out,
        force=args.force,
    )
    print(f"compressed {args.model} with {recipe.name} in {time.perf_counter() - t0:.1f} s")
    print(
        f"  streamed {report.blocks} blocks (from block {report.resumed_from}); peak resident "
        f"memory {report.peak_mib:.0f} MiB = {report.baseline_mib:.0f} MiB at start + "
        f"{report.added_peak_mib:.0f} MiB (budget {report.budget_mib:.0f} MiB)"
    )
    print(f"  artifact: {out}  {human_bytes(artifact_bytes(out))}")
    print(f"  sha256 digest: {report.digest}  (pin it: compactnn.load(..., expect_sha256=...))")
    return 0
