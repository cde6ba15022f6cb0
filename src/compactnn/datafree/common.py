"""Shared pieces of data-free compression: the generated data set, teacher hooks, a KD loop.

``GeneratedData`` is what every generator returns: inputs ``x`` (and the teacher's labels
``y``) with the generation cost. It is an iterable of input batches, so it plugs into
``compactnn.compress(model, recipe, calib_data=data)``, and it has ``x_train``/``y_train``, so
``compactnn.train(model, recipe, data)`` trains on it with the teacher's labels.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from compactnn.core.calib import main_output
from compactnn.core.memory import peak_rss_mib
from compactnn.core.progress import bar
from compactnn.datafree.input_fit import misfit_message
from compactnn.distill.kd import kd_loss
from compactnn.errors import CompactnnError, first_line


@dataclass
class GeneratedData:
    """Synthetic inputs with the teacher's labels and what producing them cost.

    Attributes:
        x: inputs ``(n, C, H, W)``.
        y: the teacher's top-1 label of each input ``(n,)``.
        cost: ``{"method", "seconds", "peak_rss_mib", ...}``: wall seconds of generation and
            the process's peak resident memory after it (``ru_maxrss``).
        batch_size: batch size when iterated as calibration data.
        settings: how the inputs were made (``{"method", "steps", "seed"}``), which
            :func:`artifact_record` records; nothing machine-dependent.

    Example:
        >>> d = GeneratedData(torch.zeros(5, 1, 4, 4), torch.zeros(5, dtype=torch.long))
        >>> [tuple(b.shape) for b in d.batches(2)]
        [(2, 1, 4, 4), (2, 1, 4, 4), (1, 1, 4, 4)]
    """

    x: torch.Tensor
    y: torch.Tensor
    cost: dict = field(default_factory=dict)
    batch_size: int = 32
    settings: dict = field(default_factory=dict)

    @property
    def x_train(self) -> torch.Tensor:
        return self.x

    @property
    def y_train(self) -> torch.Tensor:
        return self.y

    def batches(self, batch_size: int | None = None) -> list[torch.Tensor]:
        return list(torch.split(self.x, batch_size or self.batch_size))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())

    def artifact_record(self) -> dict:
        """:func:`artifact_record` of this data set (called by name by code that cannot
        import this package)."""
        return artifact_record(self)


def artifact_record(data: GeneratedData) -> dict:
    """What an artifact records of generated calibration inputs: the same for two runs with
    the same settings (wall seconds and peak memory stay in ``data.cost``, for the summary).

    Example:
        >>> cost = {"method": "bn-inversion", "seconds": 1.5, "steps": 200}
        >>> d = GeneratedData(torch.zeros(3, 1, 2, 2), torch.zeros(3), cost, settings={"seed": 0})
        >>> r = artifact_record(d)
        >>> r["method"], r["images"], r["steps"], r["input_shape"], r["seed"], r["real_data"]
        ('bn-inversion', 3, 200, [1, 2, 2], 0, False)
        >>> "seconds" in r
        False
    """
    made = {"method": data.cost.get("method"), "steps": data.cost.get("steps")}
    made.update(data.settings)
    return {
        "data": "data-free",
        "method": made.get("method"),
        "images": int(data.x.shape[0]),
        "steps": made.get("steps"),
        "input_shape": [int(d) for d in data.x.shape[1:]],
        "seed": made.get("seed"),
        "real_data": False,
    }


def logits_of(out):
    """The logits of a classifier's output as training takes them (``class_logits``): the
    output itself (a tensor), a dict's ``logits`` (else its first value), a tuple's first
    item. The output unchanged when it holds no tensor."""
    try:
        return main_output(out)
    except TypeError:  # no tensor in it: check_classifier names the type
        return out


def _logits_hook(_module, _inputs, out):
    return logits_of(out)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy whose parameters need no gradient and which returns the logits of
    the model's output (:func:`logits_of`; the user's model is untouched)."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    m.register_forward_hook(_logits_hook)  # a tuple's or dict's logits, as training takes
    return m


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of ``model``: its input is the penultimate feature."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CompactnnError(
            f"{type(model).__name__} has no nn.Linear classifier head: data-free generation "
            "needs a classifier (logits of shape (batch, classes) from a final linear layer)."
        )
    return linears[-1]


_MISSING_ARG = re.compile(r"missing \d+ required (positional|keyword-only) argument")


def check_classifier(model: nn.Module, x: torch.Tensor) -> int:
    """Number of classes; refuse a model whose output holds no ``(batch, classes)`` logits
    (a tensor, a dict's ``logits`` or a tuple's first item: :func:`logits_of`)."""
    try:
        with torch.no_grad():
            out = logits_of(model(x))
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = first_line(exc)
        if isinstance(exc, TypeError) and _MISSING_ARG.search(first):
            raise CompactnnError(
                f"{type(model).__name__} takes more than one input ({first}): data-free "
                "generation supports single-input models only (one image tensor (N, C, H, W))."
                " Wrap the model so that forward(x) takes one tensor, or calibrate on real "
                "inputs."
            ) from exc
        raise CompactnnError(misfit_message(model, x, first)) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CompactnnError(
            f"data-free generation needs a classifier returning (batch, classes) logits; "
            f"{type(model).__name__} returned {got}. Return the logits, a dict with them "
            "under 'logits', or a tuple with them first (wrap the model if it returns "
            "anything else)."
        )
    return int(out.shape[1])


class FeatureTap:
    """Records the input of ``module`` (the penultimate feature when it is the head)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, inputs):
        self.value = inputs[0]

    def remove(self) -> None:
        self.handle.remove()


def check_input_shape(input_shape) -> tuple[int, ...]:
    """Per-sample ``(C, H, W)`` from a sequence of integers or a ``"C,H,W"`` string."""
    parts = input_shape.split(",") if isinstance(input_shape, str) else input_shape
    try:
        shape = tuple(_whole(s) for s in parts) if parts is not None else ()
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise CompactnnError(
            f"input_shape={input_shape!r}: pass the per-sample input shape (C, H, W) as "
            "positive integers, e.g. input_shape=(1, 28, 28) or '1,28,28' for mnist-cnn."
        )
    return shape


def _whole(s) -> int:
    """``int(s)`` for an integer or an integral string/float; ValueError otherwise."""
    if isinstance(s, bool):
        raise ValueError(s)
    value = float(s) if isinstance(s, str) else s
    if int(value) != value:
        raise ValueError(s)
    return int(value)


def check_count(n, what: str = "n") -> int:
    """``n`` as a positive ``int``; refuse 0, negatives, floats and bools."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CompactnnError(f"{what}={n!r}: ask for at least one input (a positive integer).")
    return n


def check_steps(steps, default: int) -> int:
    """Optimisation steps: ``default`` for None, else a positive ``int``."""
    if steps is None:
        return default
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CompactnnError(
            f"steps={steps!r}: pass a positive number of optimisation steps, or steps=None "
            f"for the default ({default}); with no step the inputs would be the starting noise."
        )
    return steps


def check_module(model, what: str = "model") -> nn.Module:
    """Refuse anything but an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise CompactnnError(
            f"{what} is a {type(model).__name__}, not a torch.nn.Module: pass the network "
            "itself (build it, then load its weights)."
        )
    return model


def distill_on(
    student: nn.Module,
    teacher: nn.Module,
    sample: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    temperature: float = 1.0,
    desc: str = "distil",
    progress: bool = True,
) -> nn.Module:
    """Train ``student`` (in place) to match ``teacher`` on batches ``sample(step)``.

    Loss: ``kd_loss(student(x), teacher(x), T)`` (Hinton's softened KL), Adam with a cosine
    schedule. ``sample`` may be random noise, generated images or real images: the generic
    teacher + student + batch source loop that data-free distillation needs.
    """
    teacher = frozen_copy(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    student.train()
    for step in bar(range(steps), desc=desc, progress=progress, leave=False):
        x = sample(step)
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(logits_of(student(x)), t, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student.eval()


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_statistics_loss(
    means: list[torch.Tensor],
    stds: list[torch.Tensor],
    running_means: list[torch.Tensor],
    running_stds: list[torch.Tensor],
) -> torch.Tensor:
    """``sum_l ||mean_l - mu_l||_2 + ||std_l - sigma_l||_2`` over the BN layers ``l``.

    Example:
        >>> m, s = [torch.tensor([3.0, 4.0])], [torch.ones(2)]
        >>> float(bn_statistics_loss(m, s, [torch.zeros(2)], [torch.ones(2)]))
        5.0
    """
    total = means[0].new_zeros(())
    for m, s, rm, rs in zip(means, stds, running_means, running_stds, strict=True):
        total = total + torch.linalg.vector_norm(m - rm) + torch.linalg.vector_norm(s - rs)
    return total


def has_bn_stats(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics."""
    return any(isinstance(m, _BN) and m.running_mean is not None for m in model.modules())


class BNStats:
    """Forward hooks that record each BN layer's batch mean and std (per channel, biased).

    Each record is matched to the running statistics of the layer that made it: a layer
    called twice in one forward (a model returning ``(logits, features(x))`` that runs its
    feature extractor again) or layers called in another order than defined still match.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, _BN)]
        self.layers = [m for m in self.layers if m.running_mean is not None]
        if not self.layers:
            raise CompactnnError(
                f"{type(model).__name__} has no BatchNorm layer with running statistics: "
                "batch-norm inversion needs them; use generate(model, n, method='dafl') (a "
                "generator trained against the model) or real calibration data."
            )
        self.reset()
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def reset(self) -> None:
        """Forget the recorded statistics (before a new forward)."""
        self.means: list[torch.Tensor] = []
        self.stds: list[torch.Tensor] = []
        self.seen: list[nn.Module] = []  # the layer of each record

    def _hook(self, m, inputs, _out):
        x = inputs[0]
        dims = [0, *range(2, x.dim())]  # all but the channel axis
        self.means.append(x.mean(dims))
        self.stds.append((x.var(dims, unbiased=False) + 1e-8).sqrt())
        self.seen.append(m)

    def loss(self) -> torch.Tensor:
        rm = [m.running_mean for m in self.seen]
        rs = [(m.running_var + m.eps).sqrt() for m in self.seen]
        out = bn_statistics_loss(self.means, self.stds, rm, rs)
        self.reset()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Timer:
    """Wall seconds and peak memory of a block, as the ``cost`` dict of a data set."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0

    def cost(self, method: str, **extra) -> dict:
        return {
            "method": method,
            "seconds": round(self.seconds, 3),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            **extra,
        }
