"""``compactnn.train``: quantization-aware training from a float model to a packed artifact."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from compactnn.distill.features import FeatureDistiller
from compactnn.distill.kd import DistillationLoss, check_logits
from compactnn.engines.qat import start_epoch
from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe, resolve_recipe
from compactnn.training.checkpoint import load_checkpoint, save_checkpoint
from compactnn.training.data import TrainData, as_train_data, check_labels
from compactnn.training.wrap import freeze, prepare_qat, qat_step

_QUANT_PARAM_MARKS = (".weight_quantizer.", ".input_quantizer.", ".post.")


def param_groups(model: nn.Module, lr: float, lr_quant: float) -> list[dict]:
    """Weights and biases at ``lr``; quantizer parameters (steps, clips, scales, shifts,
    RPReLU) at ``lr_quant``."""
    quant, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_quant = any(m in f".{name}" for m in _QUANT_PARAM_MARKS) or name.endswith(
            ("shift", "gain")
        )
        (quant if is_quant else rest).append(p)
    groups = [{"params": rest, "lr": lr}]
    if quant:
        groups.append({"params": quant, "lr": lr_quant})
    return groups


def _num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(x[:2])
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise CompactnnError(
            "train() trains classifiers: the model must return logits of shape "
            f"(batch, classes), got {getattr(out, 'shape', type(out).__name__)}."
        )
    return int(out.shape[1])


def _loss_fn(qat, model, teacher, weight, temperature, features, calib_x):
    """Cross entropy, or its mix with distillation from ``teacher`` (default: ``model``)."""
    if weight == 0 and not features:
        return lambda logits, _x, y: F.cross_entropy(logits, y)
    teacher = copy.deepcopy(teacher if teacher is not None else model).eval()
    with torch.no_grad():
        check_logits(qat(calib_x[:2]), teacher(calib_x[:2]))
    fd = FeatureDistiller(qat, teacher, features) if features else None
    return DistillationLoss(teacher, weight, temperature, features=fd)


def evaluate_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in percent."""
    was = model.training
    model.eval()
    with torch.no_grad():
        hits = sum(
            int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
            for i in range(0, x.shape[0], batch)
        )
    model.train(was)
    return 100.0 * hits / max(x.shape[0], 1)


class _Run:
    """The mutable state of one training run (what a checkpoint saves)."""

    def __init__(self, qat, opt, sched, run: dict[str, Any]) -> None:
        self.qat, self.opt, self.sched, self.run = qat, opt, sched, run
        self.epoch, self.batch, self.step = 0, 0, 0
        self.history: dict[str, list[float]] = {"loss": [], "train_top1": [], "eval_top1": []}

    def state(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "model": self.qat.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "history": self.history,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.qat.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.history = state["history"]


def _train_epoch(r: _Run, data: TrainData, loss_fn, num_classes, opts) -> bool:
    """One epoch from batch ``r.batch``; returns False when ``max_steps`` stopped it."""
    bs, seed, max_steps, ckpt = opts["batch_size"], opts["seed"], opts["max_steps"], opts["ckpt"]
    r.qat.train()
    total = data.steps(bs)
    bar = tqdm(
        total=total,
        initial=r.batch,
        desc=f"epoch {r.epoch + 1}/{opts['epochs']}",
        disable=not opts["progress"],
        leave=False,
    )
    loss_sum, hits, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(data.batches(bs, r.epoch, seed)):
        if i < r.batch:
            continue  # consumed before the checkpoint this run resumed from
        if data.loader is not None:
            check_labels(y, num_classes, f"training batch {i}")
        logits = r.qat(x)
        loss = loss_fn(logits, x, y)
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        r.opt.step()
        r.sched.step()
        r.batch, r.step = i + 1, r.step + 1
        loss_sum += float(loss.detach()) * x.shape[0]
        hits += int((logits.detach().argmax(1) == y).sum())
        seen += x.shape[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * hits / seen:.1f}")
        if max_steps is not None and r.step >= max_steps:
            bar.close()
            if ckpt:
                save_checkpoint(ckpt, r.state())
            return False
    bar.close()
    r.history["loss"].append(loss_sum / max(seen, 1))
    r.history["train_top1"].append(100.0 * hits / max(seen, 1))
    return True


def train(
    model: nn.Module,
    recipe: str | Recipe,
    data: Any,
    *,
    epochs: int | None = None,
    teacher: nn.Module | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    checkpoint_dir: str | None = None,
    resume: bool = True,
    max_steps: int | None = None,
    features: Any = None,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` with a quantization-aware ``recipe``; return the frozen quantized model.

    Args:
        model: a trained float classifier (never changed; it is also the default teacher).
        recipe: ``"w2a2-lsq"``, ``"w4a4-pact"``, ``"w2a8-ttq"``, ``"w1a1-reactnet"``,
            ``"w5-inq"``, ... (defaults per recipe in ``docs/training.md``), or a Recipe.
        data: labelled training data: ``(inputs, labels)``, an embedded split, or batches.
        epochs: overrides the recipe's epochs.
        teacher: distillation teacher (default: ``model`` when the recipe distills).
        eval_data: ``(inputs, labels)`` scored after each epoch (shown and recorded).
        seed: fixes initialisation, shuffling and dropout: the same seed gives the same run.
        checkpoint_dir: write a checkpoint there after every epoch (and on ``max_steps``);
            with ``resume`` an existing one is continued exactly.
        resume: continue from ``checkpoint_dir``'s checkpoint when there is one.
        max_steps: stop after this many optimizer steps in total (then resume later).
        features: module names (or ``{student: teacher}``) for feature distillation.
        progress: progress bars with loss and accuracy.

    Example:
        >>> data = (x_train, y_train)
        >>> qmodel = compactnn.train(model, "w2a2-lsq", data, epochs=4)  # doctest: +SKIP
        >>> compactnn.save(qmodel, "out/")                               # doctest: +SKIP
    """
    recipe = resolve_recipe(recipe)
    cfg = qat_step(recipe).config
    epochs = cfg.epochs if epochs is None else epochs
    if not isinstance(epochs, int) or epochs < 0:
        raise CompactnnError(f"epochs={epochs!r} must be a non-negative integer.")
    data = as_train_data(data)
    torch.manual_seed(seed)
    calib = data.calibration()
    num_classes = _num_outputs(model, calib[0])
    if data.y is not None:
        check_labels(data.y, num_classes)
    qat = prepare_qat(model, recipe, calib, seed=seed, progress=progress)
    weight = cfg.distill if teacher is None or cfg.distill > 0 else 0.5
    loss_fn = _loss_fn(qat, model, teacher, weight, cfg.temperature, features, calib[0])
    opt = torch.optim.Adam(param_groups(qat, cfg.lr, cfg.lr_quant))
    steps = data.steps(cfg.batch_size) or 1
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps, 1))
    run = {
        "recipe": recipe.name,
        "recipe_yaml": recipe.to_yaml(),
        "epochs": epochs,
        "batch_size": cfg.batch_size,
        "seed": seed,
    }
    r = _Run(qat, opt, sched, run)
    if checkpoint_dir and resume:
        state = load_checkpoint(checkpoint_dir, run)
        if state is not None:
            r.restore(state)
    opts = {
        "batch_size": cfg.batch_size,
        "seed": seed,
        "max_steps": max_steps,
        "ckpt": checkpoint_dir,
        "epochs": epochs,
        "progress": progress,
    }
    while r.epoch < epochs:
        start_epoch(qat, r.epoch, epochs)
        if not _train_epoch(r, data, loss_fn, num_classes, opts):
            break
        if eval_data is not None:
            r.history["eval_top1"].append(evaluate_top1(qat, *eval_data))
        r.epoch, r.batch = r.epoch + 1, 0
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, r.state())
    qmodel = freeze(qat)
    qmodel._compactnn["extra"]["training"] = {
        "epochs": epochs,
        "steps": r.step,
        "complete": r.epoch >= epochs,
        **{k: [round(v, 4) for v in vals if math.isfinite(v)] for k, vals in r.history.items()},
    }
    return qmodel
