"""``compactnn deploy MODEL_OR_ARTIFACT``: run a compressed model on integer kernels, verified."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import compactnn
from compactnn.commands._common import (
    add_model_args,
    check_apart_from_inputs,
    check_not_an_input,
    load_model,
    positive_int,
    split_labels,
    thread_count,
    tolerance_steps,
)
from compactnn.commands._path_args import shown_path
from compactnn.commands.compress import note_training_recipe as _note_training_recipe
from compactnn.commands.eval_data import ONE_SPLIT_NOTE, check_data_size, read_data
from compactnn.commands.eval_table import SUSPECT_FOOTNOTE, faster_note
from compactnn.commands.evaluate import check_inputs, check_top1_labels
from compactnn.core.calib import as_batches, batch_size_of, main_output
from compactnn.deployment.api import BACKENDS, DeployedModel
from compactnn.deployment.float_check import FLOAT_CONTENDERS, FLOAT_MARGIN
from compactnn.deployment.refusals import (
    PLAIN_FLOAT_CLI,
    hf_artifact_reason,
    hf_model_reason,
    is_hf,
)
from compactnn.errors import CompactnnError
from compactnn.export.artifact import artifact_exists, check_writable, read_header
from compactnn.export.formats import check_replaceable
from compactnn.export.fs import check_file_path
from compactnn.lowering.verify import DEFAULT_TOLERANCE
from compactnn.measure.environment import oversubscribed_note
from compactnn.measure.fidelity import CollapseWarning, collapse_on
from compactnn.measure.float_paths import FloatPaths, fastest_float_path, is_plain_float
from compactnn.measure.quality import evaluate
from compactnn.measure.timing import (
    DEFAULT_RUNS,
    DEFAULT_THREADS,
    ms_text,
    suspect_mark,
    timing_suspect,
)
from compactnn.model_io import skeleton_for
from compactnn.training.data import labelled_keys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "deploy",
        help="run a compressed CNN (up to 8 bits) on integer CPU kernels, verify it, time it",
        description=(
            "Lower an artifact (or MODEL compressed in memory with --recipe, default w8a8) to "
            "integer kernels, verify it on a sample batch against the simulated model, and "
            "time it next to the float model. --onnx also writes a verified QDQ ONNX file."
        ),
    )
    p.add_argument("target", metavar="MODEL_OR_ARTIFACT")
    p.add_argument(
        "--model",
        "-m",
        help="float MODEL of an artifact (needed unless it was made from a reference model)",
    )
    p.add_argument("--recipe", "-r", default="w8a8", help="recipe for a MODEL (default w8a8)")
    p.add_argument(
        "--data",
        "-d",
        help="inputs (.safetensors/.npy or data set name); x and y tensors also give top-1",
    )
    p.add_argument(
        "--backend",
        "-b",
        default="auto",
        choices=BACKENDS,
        metavar="NAME",
        help=f"kernels to use: {', '.join(BACKENDS)} (default auto)",
    )
    p.add_argument(
        "--residual", default="exact", choices=("exact", "fast"), help="residual add mode"
    )
    p.add_argument(
        "--tolerance",
        type=tolerance_steps,
        default=DEFAULT_TOLERANCE,
        help="max steps of output scale (a number of 0 or more)",
    )
    p.add_argument("--onnx", metavar="FILE", help="also export a verified QDQ ONNX model")
    p.add_argument(
        "--save",
        metavar="DIR",
        help="save the deployed model (artifact + deployment + verification batch); "
        "compactnn.load re-deploys and re-verifies it",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an artifact at --save, a file at --onnx"
    )
    p.add_argument(
        "--threads", type=thread_count, default=DEFAULT_THREADS, help="torch threads (2)"
    )
    p.add_argument(
        "--runs", type=positive_int, default=DEFAULT_RUNS, help="timed runs, at least (median)"
    )
    p.add_argument("--quick", action="store_true", help="no torch.compile float path, 3 timed runs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_model_args(p)
    return p


def _models(args: argparse.Namespace):
    """The float model, the compressed one, a sample batch to check and time them on, and
    the ``--data`` inputs and labels (labels None unless the data holds x and y)."""
    is_artifact = artifact_exists(args.target)
    if is_artifact:
        header = read_header(args.target)
        if "deployment" in header.get("extra", {}):
            raise CompactnnError(
                f"{args.target!r} holds a deployed model (written by deploy --save): it is "
                "deployed already. Evaluate it with "
                f"`compactnn eval {shown_path(args.target)} --model ...`,"
                " or deploy the compressed artifact it came from."
            )
        if (reason := hf_artifact_reason(header, args.target)) is not None:
            raise CompactnnError(reason)  # before --model and --data are asked for
        loaded = skeleton_for(
            header,
            args.model,
            weights=args.weights,
            trust_pickle=args.trust_pickle,
        )
        # loaded (re-deployed when it is a deployed artifact) after the data checks below,
        # so a bad --data is named before any of that work
    elif Path(args.target).is_dir() and not (Path(args.target) / "config.json").is_file():
        raise CompactnnError(f"{args.target!r} holds neither an artifact nor a model.")
    else:
        loaded = load_model(args.target, args)
        if is_hf(loaded.model):  # before --data is asked for and the recipe calibrated
            raise CompactnnError(hf_model_reason(args.target, args.recipe, loaded.model))
    data = read_data(args.data, loaded) if args.data else loaded.calib
    # a held-out split: verify, time, score
    inputs, labels = split_labels(data, note=False, model=loaded.model)
    if args.data:  # images of another size than a reference takes: report's one line
        check_data_size(args.data, loaded, inputs)
    calib = split_labels(data, role="train", note=False, model=loaded.model)[0]
    labelled = labelled_keys(data, "train") if isinstance(data, dict) else None
    one_split = labelled is None or labelled == labelled_keys(data, "eval")
    if not one_split:
        _say_splits(labelled, labelled_keys(data, "eval"), calibrating=not is_artifact)
    # messages name its role
    named = f"--data {shown_path(args.data)}" if args.data else "calib_data"
    batches = as_batches(inputs, what=named) if inputs is not None else as_batches(loaded.example)
    if not batches:
        raise CompactnnError("deploy needs sample inputs to verify on: pass --data.")
    if args.data:
        out = check_inputs(loaded, batches[0])
        if labels is not None:  # before any deployment or timing
            check_top1_labels(main_output(out), labels, f"--data {shown_path(args.data)}")
    if is_artifact:
        qmodel = compactnn.load(args.target, model=loaded.model)
    else:
        _note_training_recipe(compactnn.resolve_recipe(args.recipe), args.target, args.recipe)
        if args.data and labels is not None and one_split:  # scored where calibrated
            print(ONE_SPLIT_NOTE, file=sys.stderr)
        qmodel = compactnn.compress(
            loaded.model, args.recipe, calib_data=calib, progress=not args.no_progress
        )
    return loaded, qmodel, batches[0], (inputs, labels)


def _say_splits(train: tuple[str, str], held_out: tuple[str, str], calibrating: bool) -> None:
    """Which labelled split of ``--data`` each use reads, when it holds more than one."""
    if train == held_out:
        return
    calib = f"calibrating on {train[0]}, " if calibrating else ""
    print(
        f"note: --data holds {train[0]}/{train[1]} and {held_out[0]}/{held_out[1]}: "
        f"{calib}verifying, timing and scoring on {held_out[0]}/{held_out[1]} (held out)",
        file=sys.stderr,
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any slow work, an ``--onnx`` file or ``--save`` folder that could not
    be written, the two naming the same path or one lying inside the other (the second
    write would fail, or replace the first), and either one that would destroy an input of
    the command (``--force`` or not): ``--onnx`` an input file or a file inside an input
    folder, ``--save`` an input, a folder inside one, or a folder holding one."""
    if args.save and args.onnx:
        onnx, save = Path(args.onnx).resolve(), Path(args.save).resolve()
        if onnx == save or save in onnx.parents or onnx in save.parents:
            where = "is the same path as" if onnx == save else "overlaps"
            raise CompactnnError(
                f"--onnx {args.onnx!r} {where} --save {args.save!r}: the ONNX file and the "
                "deployed model folder need separate paths, e.g. --onnx model.onnx --save "
                "deployed/."
            )
    inputs = {"MODEL_OR_ARTIFACT": args.target, "--model": args.model}
    inputs |= {"--weights": args.weights, "--data": args.data}
    if args.save:
        check_apart_from_inputs(args.save, "--save", inputs, suggest="deployed")
        check_writable(args.save, args.force, what="--save")
    if args.onnx:
        check_not_an_input(args.onnx, "--onnx", inputs, suggest="model.onnx")
        check_file_path(args.onnx, "--onnx", force=args.force, suggest="model.onnx")
        if args.force:  # replaces an earlier ONNX export only, as `compactnn export --force`
            check_replaceable("onnx", args.onnx, "--onnx")


def _save(deployed, args: argparse.Namespace, onnx_existed: bool) -> None:
    """``--save``; when it fails, the ONNX file this run wrote goes too (not one it replaced)."""
    from compactnn.deployment.ship import save_deployed

    try:
        digest = save_deployed(deployed, args.save, force=args.force)
    except BaseException:
        if args.onnx and not onnx_existed:
            Path(args.onnx).unlink(missing_ok=True)
        raise
    print(f"saved the deployed model to {args.save} (sha256 {digest})")
    print(f"  {_stored_samples_note(deployed, args)}")


def _stored_samples_note(deployed: DeployedModel, args: argparse.Namespace) -> str:
    """Which of the user's inputs ``--save`` put into the artifact, and how to avoid it."""
    from compactnn.deployment.ship import MAX_SAMPLES

    n = min(batch_size_of(deployed.example) or MAX_SAMPLES, MAX_SAMPLES)
    source = f"--data {shown_path(args.data)}" if args.data else "the model's calibration data"
    where = Path(args.save) / "deployment.safetensors"
    return (
        f"{where} holds {n} sample(s) of {source} (the batch compactnn.load verifies the "
        "model on again): share the artifact only where those inputs may go; deploy has no "
        "option to leave them out (save_deployed(deployed, path, example=...) in Python stores "
        "other inputs instead)"
    )


def _export(qmodel, example, deployed: DeployedModel, args) -> CompactnnError | None:
    """``--onnx``: write and verify the file, print its line (and a note when deploy's backend
    choice timed it slower than float); its refusal is returned, not raised."""
    from compactnn.export.onnx import export_onnx

    try:
        with warnings.catch_warnings():  # run() says it already, against the real float model
            warnings.simplefilter("ignore", CollapseWarning)
            result = export_onnx(
                qmodel, args.onnx, example, tolerance=args.tolerance, force=args.force
            )
    except CompactnnError as exc:
        return exc
    print(f"wrote {args.onnx}: {result}")
    if onnx_speed_note(deployed.selection, deployed.backend, None) is not None:  # then count
        note = onnx_speed_note(deployed.selection, deployed.backend, _conv_kinds(args.onnx))
        print(f"  note: {note}")
    return None


def _refused_onnx(refusal: CompactnnError, deployed: DeployedModel, args) -> str:
    """The export's refusal, with what became of ``--save`` and why the deployed model passed
    where the file did not."""
    kept = f" The deployed model was saved to {args.save} all the same." if args.save else ""
    how = ""
    if deployed.verification is not None and deployed.verification.isolated:
        how = (
            f" The {deployed.backend} deployment passed above its tolerance only because each "
            "of its kernels, run alone on the simulation's inputs, matches its layer; an ONNX "
            "Runtime session runs as one graph and cannot be checked that way, so the file is "
            "held to --tolerance alone."
        )
    from compactnn.export.onnx import BINARY_SHIP, BINARY_SHIP_CLI

    said = str(refusal).replace(BINARY_SHIP, BINARY_SHIP_CLI)  # command-line words
    return f"--onnx {args.onnx!r} not written: {said}{kept}{how}"


def _conv_kinds(path: str) -> tuple[int, int] | None:
    """Convolutions ONNX Runtime runs in float and as ``QLinearConv`` in the optimized graph
    of ``path`` (one session build, no timing); None when it cannot be read."""
    from compactnn.export.ort import optimized_graph

    try:
        ops = [n.op_type for n in optimized_graph(path).graph.node]
    except Exception:  # the note then names the documented cause only
        return None
    return sum(op in FLOAT_CONVS for op in ops), ops.count("QLinearConv")


FLOAT_CONVS = ("Conv", "FusedConv", "NhwcFusedConv")  # float kernels of ONNX Runtime (CPU)


def onnx_speed_note(
    selection: dict[str, float], backend: str, convs: tuple[int, int] | None
) -> str | None:
    """The note after "wrote FILE" when the backend choice timed the file's graph (its
    ``onnxruntime`` contender, the same QDQ graph) slower than the fastest float path: how
    much, why where ``convs`` (float, int8 convolutions of the optimized graph) tells, and
    the way out. None when it was not timed or is not slower.

    Example:
        >>> sel = {"onednn": 2.4e-3, "onnxruntime": 36.7e-3, "fp32-onnxruntime": 5.8e-3}
        >>> onnx_speed_note(sel, "onednn", (6, 3)).split(" (")[0]
        'on ONNX Runtime this file ran 6.3x slower than the float model'
    """
    floats = {k: v for k, v in selection.items() if k in FLOAT_CONTENDERS}
    t_file = selection.get("onnxruntime")
    if t_file is None or not floats:
        return None
    best = min(floats, key=floats.get)
    if t_file <= floats[best] * FLOAT_MARGIN:
        return None
    said = (
        f"on ONNX Runtime this file ran {t_file / floats[best]:.1f}x slower than the float "
        f"model ({ms_text(t_file)} against {ms_text(floats[best])} ms on {best}, "
        "the backend choice above, whose session folds the weights of the layers ONNX Runtime "
        "runs in float: the file as written keeps their int8 codes and runs no faster)"
    )
    fixed = (
        "each int8 layer pays a fixed cost (quantize, launch, requantize) that small inputs "
        "and thin convolutions do not earn back"
    )
    float_convs = (
        "one whose output the simulation keeps in float (a residual add, hardswish or "
        "squeeze-excite product reads it) has no QuantizeLinear after it, so ONNX Runtime "
        "does not fuse it into QLinearConv"
    )
    if convs is None:  # not counted: the documented causes
        why = f"{fixed}, and a convolution may run in float: {float_convs}"
    elif convs[0]:
        why = (
            f"ONNX Runtime runs {convs[0]} of its {sum(convs)} convolutions in float on "
            f"weights dequantized at every call: {float_convs}"
        )
    else:
        why = f"ONNX Runtime runs all {convs[1]} convolutions as QLinearConv, but {fixed}"
    t_dep = selection.get(backend)
    if t_dep is not None and t_dep < floats[best] and backend != "onnxruntime":
        out = f"ship the deployed {backend} model ({ms_text(t_dep)} ms) with --save DIR"
    else:
        out = "run the float model"
    if convs is None or convs[0]:
        out += (
            "; or, in Python, export quantize_residuals(qmodel, calib, grids='all') "
            "(compactnn.deployment.residual), whose every convolution and add ONNX Runtime "
            "runs on int8 (docs/deploy.md, Quantized residuals)"
        )
    return f"{said}: {why}. For speed, {out}."


def _latency_lines(
    args: argparse.Namespace, deployed: DeployedModel, paths: FloatPaths, batch: int | None
) -> list[str]:
    """The latency table (cells whose timing looked inflated marked ``*``, as ``eval``
    marks them), its footnote, and the notes on the deployed model's speedup."""
    best = paths.best.to_dict()
    runs = 3 if args.quick else args.runs
    compile_ = "" if args.quick else ", torch.compile among the float paths"
    lines = [
        f"latency: median of at least {runs} runs (a fast model: blocks of about 0.1 s), "
        f"batch {batch}, {args.threads} threads{compile_}, every "
        "contender timed side by side (rotating blocks):"
    ]
    if (over := oversubscribed_note(args.threads)) is not None:
        lines.append(over)
    for label, t in paths.timings.items():
        mine = t.to_dict()
        latency = t.fmt() + suspect_mark(mine)
        speedup = f"{best['median_s'] / t.median_s:5.2f}x" + suspect_mark(mine, best)
        lines.append(f"  {label:<14} {latency:>26}  {speedup} vs {paths.winner}")
    if timing_suspect(best, *(t.to_dict() for t in paths.timings.values())):
        lines.append(SUSPECT_FOOTNOTE)
    for why, reason in paths.skipped.items():
        lines.append(f"  skipped {why}: {reason}")
    t = paths.timings.get("deployed")
    if t is not None:
        suspect = timing_suspect(best, t.to_dict())
        if (said := faster_note(best["median_s"], t.median_s, suspect=suspect)) is not None:
            lines.append(f"  note: deployed {said}")
    if (said := _disagreement(deployed, paths)) is not None:
        lines.append(f"  note: {said}")
    return lines


def _disagreement(deployed: DeployedModel, paths: FloatPaths) -> str | None:
    """A line when the backend choice advised float but the longer timing finds the deployed
    model faster than the fastest float path (a loaded machine can make the short race and
    the table disagree; neither line should stand alone)."""
    t = paths.timings.get("deployed")
    if not deployed.recommendation or t is None or t.median_s >= paths.best.median_s:
        return None
    return (
        f"the timing above finds the deployed model {paths.best.median_s / t.median_s:.2f}x "
        f"faster than {paths.winner}, against the backend choice's short race that advised "
        "float: the machine's load moved one of them; time it again on a quieter machine"
    )


def run(args: argparse.Namespace) -> int:
    check_outputs(args)  # before the slow work
    loaded, qmodel, example, (inputs, labels) = _models(args)
    if is_plain_float(qmodel):  # e.g. a channel-pruned artifact: the command line's words
        raise CompactnnError(PLAIN_FLOAT_CLI)
    with warnings.catch_warnings():  # the advice is printed below, once, as a note
        warnings.filterwarnings("ignore", message=r"deploy: .* faster than int8")
        warnings.simplefilter("ignore", CollapseWarning)  # said below, against the float model
        deployed = compactnn.deploy(
            qmodel, args.backend, example=example, tolerance=args.tolerance, residual=args.residual
        )
    print(f"deployed on {deployed.backend}: {deployed.verification}")
    step = deployed.verification.output_step if deployed.verification is not None else None
    if (collapsed := collapse_on(loaded.model, qmodel, example, step)) is not None:
        print(f"warning: {collapsed}", file=sys.stderr)
    for name, reason in deployed.kept_float.items():
        print(f"  kept in float: {name} ({reason})")
    if deployed.selection:
        timed = ", ".join(f"{k} {ms_text(v)} ms" for k, v in deployed.selection.items())
        how = "fastest call of each on the sample batch; a close race is run again, 12 calls more"
        print(f"backend choice ({how}): {timed}")
    if deployed.recommendation:
        print(f"  note: {deployed.recommendation.removeprefix('deploy: ')}")
    onnx_existed = bool(args.onnx) and os.path.lexists(args.onnx)
    if args.onnx:  # before --save: a failed --save removes the file this run wrote
        refusal = _export(qmodel, example, deployed, args)
        if refusal is not None:  # the verified deployed model does not depend on the file
            if args.save:
                _save(deployed, args, onnx_existed)
            raise CompactnnError(_refused_onnx(refusal, deployed, args))
    if args.save:
        _save(deployed, args, onnx_existed)
    paths = fastest_float_path(
        loaded.model, example, quick=args.quick, threads=args.threads,
        runs=3 if args.quick else args.runs, extra={"simulated": qmodel, "deployed": deployed},
    )  # fmt: skip
    print("\n".join(_latency_lines(args, deployed, paths, batch_size_of(example))))
    if labels is not None:
        progress = not args.no_progress
        sim_q = evaluate(qmodel, (inputs, labels), progress=progress)
        dep_q = evaluate(deployed, (inputs, labels), progress=progress)
        print(f"top-1 on --data: simulated {sim_q:.2f}%, deployed {dep_q:.2f}%")
    elif loaded.reference is not None and loaded.reference.metric == "top1":
        sim_q, dep_q = loaded.reference.evaluate(qmodel), loaded.reference.evaluate(deployed)
        print(
            f"top-1 on {loaded.reference.name}'s held-out split: simulated {sim_q:.2f}%, deployed "
            f"{dep_q:.2f}% (the deployed model itself)"
        )
    return 0
