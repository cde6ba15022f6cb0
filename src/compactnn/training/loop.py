"""``compactnn.train``: quantization-aware training from a float model to a packed artifact."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from compactnn.api import with_ignored
from compactnn.core.context import CompressContext
from compactnn.core.model_input import unwrap_model, working_copy
from compactnn.core.modules import check_target_names
from compactnn.core.progress import bar as progress_bar
from compactnn.core.seeding import keeps_global_rng
from compactnn.distill.features import FeatureDistiller
from compactnn.distill.kd import DistillationLoss, check_logits
from compactnn.engines.binary import recalibrate_norms
from compactnn.engines.qat import keep_eligible, start_epoch
from compactnn.errors import CompactnnError
from compactnn.float_layers import report_float_layers
from compactnn.recipe import Recipe, resolve_recipe
from compactnn.training import batch_norm, distributed
from compactnn.training.checkpoint import (
    check_checkpoint_dir,
    checkpoint_path,
    load_checkpoint,
    run_fingerprints,
    save_checkpoint,
    scoring_fingerprints,
)
from compactnn.training.data import (
    TrainData,
    as_eval_data,
    as_train_data,
    check_finite_inputs,
    check_labels,
    class_logits,
    float_dtype,
    num_outputs,
)
from compactnn.training.epoch_log import EpochLog, check_log_path, format_epoch
from compactnn.training.resume import (
    EpochProgress,
    epoch_batches,
    epoch_record,
    loader_generators,
    rng_state,
    set_rng_state,
)
from compactnn.training.schedule import (
    epochs_for_min_steps,
    lr_schedule,
    param_groups,
)
from compactnn.training.wrap import freeze, prepare_qat, qat_step

_dist = distributed  # in train() its argument ``distributed`` shadows the module's name


def norm_recalibrator(cfg, data: TrainData, device: torch.device, seed: int):
    """``fn(model)`` re-estimating binary blocks' batch norms on the first
    ``cfg.recalibrate_batches`` training batches, or None when the config asks for none."""
    limit = getattr(cfg, "recalibrate_batches", 0)
    if limit <= 0:
        return None

    def recalibrate(model: nn.Module) -> None:
        batches = data.batches(cfg.batch_size, 0, seed)
        recalibrate_norms(model, (x.to(device) for x, _y in islice(batches, limit)))

    return recalibrate


class _Logits(nn.Module):
    """``model`` returning the logits of its output (:func:`class_logits`): a teacher that
    returns a dict or a tuple is distilled from its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> torch.Tensor:
        return class_logits(self.model(x))


def _loss_fn(qat, model, teacher, weight, temperature, features, calib_x):
    """Cross entropy, or its mix with distillation from ``teacher`` (default: ``model``),
    on the logits of each output (:func:`class_logits`)."""
    if weight == 0 and not features:
        return lambda logits, _x, y: F.cross_entropy(logits, y)
    teacher = working_copy(teacher if teacher is not None else model).eval()
    with torch.no_grad():
        check_logits(class_logits(qat(calib_x[:2])), class_logits(teacher(calib_x[:2])))
    fd = FeatureDistiller(qat, teacher, features) if features else None
    return DistillationLoss(_Logits(teacher), weight, temperature, features=fd)


def evaluate_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in percent."""
    was = model.training
    model.eval()
    with torch.no_grad():
        hits = sum(
            int((class_logits(model(x[i : i + batch])).argmax(1) == y[i : i + batch]).sum())
            for i in range(0, x.shape[0], batch)
        )
    model.train(was)
    return 100.0 * hits / max(x.shape[0], 1)


class _Run:
    """The mutable state of one training run (what a checkpoint saves)."""

    def __init__(self, qat, opt, sched, run: dict[str, Any], env, gens: list) -> None:
        self.qat, self.opt, self.sched, self.run, self.env = qat, opt, sched, run, env
        self.gens = gens  # the loader's own torch.Generators: saved and restored as the RNG
        self.epoch, self.batch, self.step = 0, 0, 0
        self.history: dict[str, list[float]] = {"loss": [], "train_top1": [], "eval_top1": []}
        # keep_best: {"epoch" (1-based), "eval_top1", "state" (the wrapped model's state)}
        self.best: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []  # the log's records of the epochs done
        self.progress: EpochProgress | None = None  # the epoch under way
        self.partial: dict[str, Any] | None = None  # its state for a mid-epoch checkpoint

    def state(self) -> dict[str, Any]:
        """The checkpoint (whole tensors; under FSDP2 gathered: every rank calls)."""
        best = {} if self.best is None else {"best": self.best}
        model, optimizer = distributed.full_state(self.env, self.qat, self.opt)
        return {
            **best,
            "run": self.run,
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.sched.state_dict(),
            **rng_state(self.gens),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "history": self.history,
            "records": self.records,
            **({} if self.partial is None else {"partial": self.partial}),
        }

    def restore(self, state: dict[str, Any]) -> None:
        distributed.load_full_state(
            self.env, self.qat, self.opt, state["model"], state["optimizer"]
        )
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state, self.gens)
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.history = state["history"]
        self.best = state.get("best")
        self.records = state.get("records", [])
        partial = state.get("partial") if self.batch else None  # None: the epoch restarts sums
        self.progress = partial and EpochProgress.restore(partial, self.env.is_main)


def _train_epoch(r: _Run, data: TrainData, loss_fn, num_classes, opts) -> bool:
    """One epoch from batch ``r.batch``; returns False when ``max_steps`` stopped it."""
    bs, seed, max_steps, ckpt = (opts[k] for k in ("batch_size", "seed", "max_steps", "ckpt"))
    env, forward = opts["env"], opts["forward"]
    r.qat.train()
    total = data.steps(bs)
    bar = progress_bar(
        total=total,
        initial=r.batch,
        desc=f"epoch {r.epoch + 1}/{opts['epochs']}",
        progress=opts["progress"],
        leave=False,
    )
    p = r.progress
    loss_sum, hits, seen = p.sums
    for i, (x, y) in epoch_batches(data, bs, r.epoch, seed, r.batch, p):
        if data.loader is not None:
            check_labels(y, num_classes, f"training batch {i}")
        x, y = distributed.shard(env, x, y)  # this rank's slice of the global batch
        logits = class_logits(forward(x))  # a dict's "logits", a tuple's first item
        loss = loss_fn(logits, x, y)
        value = float(loss.detach())
        loss_sum += value * x.shape[0]
        hits += int((logits.detach().argmax(1) == y).sum())
        seen += x.shape[0]
        shown = _check_finite(env, value, r, i, bar, [loss_sum, hits, seen])
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        r.opt.step()
        r.sched.step()
        r.batch, r.step = i + 1, r.step + 1
        bar.update(1)  # the epoch's sums so far over every rank, as its line will say
        bar.set_postfix(loss=f"{shown[0] / shown[2]:.3f}", acc=f"{100 * shown[1] / shown[2]:.1f}")
        if max_steps is not None and r.step >= max_steps:
            bar.close()
            if ckpt:  # the epoch's sums so far: its record then equals the uninterrupted one's
                r.partial = p.state(shown)  # summed over the ranks
            _checkpoint(env, ckpt, r)
            return False
    bar.close()
    loss_sum, hits, seen = distributed.sum_over_ranks(env, [loss_sum, hits, seen])
    r.history["loss"].append(loss_sum / max(seen, 1))
    r.history["train_top1"].append(100.0 * hits / max(seen, 1))
    return True


def _check_finite(env, loss: float, r: _Run, batch: int, bar, sums: list) -> list[float]:
    """Stop on a NaN or infinite training loss, before it poisons the weights; else return
    the epoch's running ``sums`` over every rank (the same collective, on every rank)."""
    bad = not math.isfinite(loss)
    if env.active:  # every rank stops together, not only the one that saw it
        bad, *sums = distributed.sum_over_ranks(env, [float(bad), *sums])
        bad = bad > 0
    if bad:
        bar.close()
        raise CompactnnError(
            f"training loss is {loss} at epoch {r.epoch + 1}, batch {batch} (step {r.step + 1}): "
            "check the training data for NaN or Inf values (torch.isfinite(x).all()), "
            "or lower the learning rate if the data is finite."
        )
    return sums


def _checkpoint(env: distributed.DistEnv, directory: str | None, r: _Run) -> None:
    """Rank 0 writes the checkpoint; every rank waits until it is there."""
    if directory:
        state = r.state()  # every rank: FSDP2 gathers the shards
        if env.is_main:
            save_checkpoint(directory, state)
        distributed.barrier(env)


def _score_epoch(r: _Run, eval_xy, keep_best: bool) -> float | None:
    """Top-1 of this epoch's frozen model on ``eval_xy`` (recorded); keeps the best state."""
    if eval_xy is None:
        return None
    top1 = evaluate_top1(freeze(distributed.plain_model(r.env, r.qat)), *eval_xy)
    r.history["eval_top1"].append(top1)
    eligible = keep_best and keep_eligible(r.qat)  # e.g. PE-wise: only at its final sparsity
    if eligible and (r.best is None or top1 >= r.best["eval_top1"]):  # ties: later epoch
        model = distributed.full_state(r.env, r.qat)[0]
        state = {k: v.detach().clone() for k, v in model.items()}
        r.best = {"epoch": r.epoch + 1, "eval_top1": top1, "state": state}
    return top1


def _record_float_layers(qmodel: nn.Module) -> None:
    """Every layer the frozen model keeps in float gets its reason in the record, as
    compress gives it (:func:`report_float_layers`; an ignored or untargeted layer: "not
    targeted by the recipe"). The reasons training recorded itself (it warned) stand."""
    info = qmodel._compactnn
    ctx = CompressContext(float_layers=info["float_layers"], extra=info["extra"])
    ctx.skipped = dict(ctx.float_layers)  # warned about already: not again
    report_float_layers(qmodel, ctx, {}, {})


def _final_model(r: _Run, keep_best: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen model to return (the best epoch's with ``keep_best``) and what was kept."""
    plain = distributed.plain_model(r.env, r.qat, "cpu")
    if not keep_best:
        return freeze(plain), {}
    if r.best is None:  # no epoch finished: the model as it stands
        return freeze(plain), {"kept_epoch": None}
    qat = copy.deepcopy(plain) if plain is r.qat else plain
    qat.load_state_dict(r.best["state"])
    kept = {
        "kept_epoch": r.best["epoch"],
        "kept_eval_top1": round(r.best["eval_top1"], 4),
    }
    return freeze(qat), kept


@keeps_global_rng  # train seeds torch for its own run only: the caller's states come back
@distributed.rank0_warnings  # under torchrun, rank 0 alone shows each warning
def train(
    model: nn.Module,
    recipe: str | Recipe,
    data: Any,
    *,
    epochs: int | None = None,
    teacher: nn.Module | None = None,
    eval_data: Any = None,
    seed: int = 0,
    checkpoint_dir: str | None = None,
    resume: bool = True,
    max_steps: int | None = None,
    features: Any = None,
    progress: bool = True,
    log_path: str | Path | None = None,
    force: bool = False,
    keep_best: bool = False,
    device: str | torch.device | None = None,
    distributed: str = "ddp",
    ignore: Sequence[str] = (),
) -> nn.Module:
    """Train ``model`` with a quantization-aware ``recipe``; return the frozen quantized model.

    After every epoch one line (training loss and top-1, held-out top-1, seconds, learning
    rate) is printed through ``tqdm.write`` (none with ``progress=False``) and recorded in
    ``model._compactnn["extra"]["training"]``.

    Args:
        model: a trained float classifier (never changed; it is also the default teacher).
        recipe: ``"w2a2-lsq"``, ``"w4a4-pact"``, ``"w2a8-ttq"``, ``"w1a1-reactnet"``,
            ``"w5-inq"``, ... (defaults per recipe in ``docs/training.md``), or a Recipe.
        data: labelled training data: ``(inputs, labels)``, an embedded split, or batches.
        epochs: overrides the recipe's epochs (and its ``min_steps``: without ``epochs``,
            a recipe that sets ``min_steps`` trains enough epochs to make that many steps).
        teacher: distillation teacher (default: ``model`` when the recipe distills).
        eval_data: held-out ``(inputs, labels)`` (or a dict with ``x``/``y``): the frozen
            model of each epoch is scored on it (top-1, printed and recorded).
        seed: fixes initialisation, shuffling and dropout: the same seed gives the same run
            (the caller's global RNG state is put back afterwards).
        checkpoint_dir: write a checkpoint there after every epoch (and on ``max_steps``);
            with ``resume`` an existing one is continued exactly. A file, or a folder where
            no file can be written, is refused before any training.
        resume: continue from ``checkpoint_dir``'s checkpoint when there is one.
        max_steps: stop after this many optimizer steps in total (then resume later).
        features: module names (or ``{student: teacher}``) for feature distillation.
        progress: progress bars with loss and accuracy, and the per-epoch lines.
        log_path: a JSON-lines file, one record per epoch: ``epoch``, ``step``,
            ``train_loss``, ``train_top1``, ``eval_top1`` (null without ``eval_data``),
            ``seconds``, ``lr`` (the weights' learning rate at the epoch's first step).
            An existing file is refused unless ``force`` (a resumed run rewrites it with
            the checkpoint's records, then appends).
        force: replace an existing ``log_path`` file.
        keep_best: return the frozen model of the epoch with the best held-out top-1 (ties:
            the later epoch) instead of the last one; needs ``eval_data`` and ``epochs``
            of 1 or more. The history's ``kept_epoch`` says which (1-based). An epoch a
            method marks ineligible (PE-wise before its masks reach the recipe's sparsity)
            is never kept.
        device: ``"cuda"`` trains on this rank's GPU (``"cpu"`` by default); the returned
            model is on the CPU either way.
        distributed: under ``torchrun``, ``"ddp"`` replicates the student on every rank,
            ``"fsdp2"`` shards its parameters, gradients and optimizer state over the ranks
            (:mod:`compactnn.training.fsdp`); ignored in a single process.
        ignore: module names or ``fnmatch`` patterns left in float (added to the step's
            ``targets.ignore``, as :func:`compactnn.compress` does; a container's name
            covers its children); the artifact records them as float layers.

    Under ``torchrun --nproc-per-node N`` the same call trains on N processes with
    DistributedDataParallel: the recipe's batch size is the global batch, split over the
    ranks, with the same learning rate; rank 0 prints, logs and checkpoints
    (:mod:`compactnn.training.distributed`, ``docs/scale.md``).

    Example:
        >>> data = (x_train, y_train)  # doctest: +SKIP
        >>> qmodel = compactnn.train(model, "w2a2-lsq", data, epochs=4,  # doctest: +SKIP
        ...                          eval_data=(x_test, y_test), keep_best=True)
        >>> compactnn.save(qmodel, "out/")                               # doctest: +SKIP
    """
    model = unwrap_model(model, "training")  # torch.compile / DataParallel: the model inside
    if checkpoint_dir:
        check_checkpoint_dir(checkpoint_dir)  # a file, unwritable: before any work, every rank
    resumes = bool(checkpoint_dir) and resume and checkpoint_path(checkpoint_dir).is_file()
    check_log_path(log_path, appends=resumes, force=force)  # every rank, before they meet
    recipe = resolve_recipe(recipe)
    check_target_names(model, recipe)
    recipe = with_ignored(recipe, model, ignore)
    cfg = qat_step(recipe).config
    epochs_given = epochs
    epochs = cfg.epochs if epochs is None else epochs
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        whose = "" if epochs_given is not None else f" (recipe {recipe.name}'s)"
        raise CompactnnError(
            f"epochs={epochs!r}{whose} must be a whole number of 1 or more (0 trains nothing): "
            "pass epochs=1 or more, or use compactnn.compress for a model calibrated without "
            "training."
        )
    if keep_best and eval_data is None:
        raise CompactnnError(
            "keep_best=True picks the epoch with the best held-out top-1, so it needs "
            "eval_data=(x_test, y_test); pass it, or drop keep_best."
        )
    data = as_train_data(data, dtype=float_dtype(model))  # float inputs: the model's dtype
    env = _dist.detect(device, distributed)
    progress = progress and env.is_main
    log_path = log_path if env.is_main else None
    torch.manual_seed(seed)
    prints = run_fingerprints(model, data) if checkpoint_dir else {}  # before prepare_qat
    calib = data.calibration()
    check_finite_inputs(data, calib)  # named as training data, before any work on it
    num_classes = num_outputs(model, calib[0])
    if data.y is not None:
        check_labels(data.y, num_classes)
    eval_xy = None
    if eval_data is not None:
        eval_xy = as_eval_data(eval_data, calib[0], dtype=float_dtype(model))
        check_labels(eval_xy[1], num_classes, "eval_data")
    if checkpoint_dir:  # a resumed run must score (and keep) its epochs as this one would
        prints |= scoring_fingerprints(eval_xy, keep_best)
    if eval_xy is not None:
        eval_xy = tuple(t.to(env.device) for t in eval_xy)
    qat = prepare_qat(model, recipe, calib, seed=seed, progress=progress)
    steps = batch_norm.fit_batches(qat, data, cfg.batch_size, calib[0], env.world_size)
    weight = cfg.distill if teacher is None or cfg.distill > 0 else 0.5
    loss_fn = _loss_fn(qat, model, teacher, weight, cfg.temperature, features, calib[0])
    if env.device.type != "cpu":
        qat.to(env.device)
        if isinstance(loss_fn, nn.Module):
            loss_fn.to(env.device)
    forward = _dist.wrap(env, qat)  # FSDP2 replaces the parameters: before the optimizer
    opt = torch.optim.Adam(param_groups(qat, cfg.lr, cfg.lr_quant))
    if epochs_given is None:
        epochs = epochs_for_min_steps(epochs, steps, getattr(cfg, "min_steps", 0))
    sched = lr_schedule(opt, max(epochs * steps, 1), getattr(cfg, "warmup_steps", 0))
    run = {
        "recipe": recipe.name,
        "recipe_yaml": recipe.to_yaml(),
        "epochs": epochs,
        "batch_size": cfg.batch_size,
        "seed": seed,
        **prints,  # the starting model and data: a checkpoint of another is refused
    }
    r = _Run(qat, opt, sched, run, env, loader_generators(data.loader))
    state = load_checkpoint(checkpoint_dir, run) if checkpoint_dir and resume else None
    if state is not None:
        r.restore(state)
    log = EpochLog(log_path, append=state is not None, records=state and state.get("records"))
    opts = {
        "batch_size": cfg.batch_size, "seed": seed, "max_steps": max_steps,
        "ckpt": checkpoint_dir, "epochs": epochs, "progress": progress, "env": env,
        "forward": forward,
    }  # fmt: skip
    recalibrate = norm_recalibrator(cfg, data, env.device, seed)
    while r.epoch < epochs:
        start_epoch(qat, r.epoch, epochs)
        if r.progress is None:  # a new epoch (or one of a checkpoint that kept no sums)
            r.progress = EpochProgress(opt.param_groups[0]["lr"], r.gens)
        if not _train_epoch(r, data, loss_fn, num_classes, opts):
            break
        if recalibrate is not None and eval_xy is not None:
            recalibrate(qat)  # before scoring (and keeping) this epoch's model
        top1 = _score_epoch(r, eval_xy, keep_best)
        record = epoch_record(r.epoch, r.step, r.history, top1, r.progress)
        r.records.append(record)
        log.write(record)  # a resume rewrites the log from the checkpoint's records
        if progress:
            tqdm.write(format_epoch(record, epochs))
        r.epoch, r.batch, r.progress, r.partial = r.epoch + 1, 0, None, None
        _checkpoint(env, checkpoint_dir, r)
    if recalibrate is not None and (eval_xy is None or r.epoch < epochs):
        recalibrate(qat)  # the last epoch's model was not recalibrated yet
    qmodel, kept = _final_model(r, keep_best)
    _record_float_layers(qmodel)
    qmodel._compactnn["extra"]["training"] = {
        "epochs": epochs,
        "steps": r.step,
        "complete": r.epoch >= epochs,
        **{k: [round(v, 4) for v in vals if math.isfinite(v)] for k, vals in r.history.items()},
        **kept,
    }
    return qmodel
