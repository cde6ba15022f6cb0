"""Quality of a model on labelled data: top-1 accuracy or a metric the user supplies.

``data`` takes every form :func:`compactnn.train` takes (it is normalised by
:func:`compactnn.training.data.as_train_data`): an ``(inputs, labels)`` pair of tensors, a
mapping with ``x``/``y`` tensors (a ``.safetensors`` file read with ``safetensors``), an
object with ``x_train``/``y_train``, or an iterable of ``(inputs, labels)`` batches such as a
``DataLoader``. Inputs may also be keyword tensors: ``({"input_ids": ..., "attention_mask":
...}, labels)``, or a mapping holding ``y`` (or ``labels``) beside named input tensors.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2))
    >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]), torch.tensor([0, 1, 1])
    >>> round(evaluate(model, (x, y)), 2)
    66.67
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import (
    call_model,
    describe,
    expected_input_hint,
    main_output,
)
from compactnn.core.progress import bar as progress_bar
from compactnn.core.tokens import warn_unmasked_padding
from compactnn.errors import CompactnnError, first_line
from compactnn.training.data import (
    as_eval_data,
    as_train_data,
    check_labels,
    eval_pair,
    keyword_split,
    labelled_keys,
)

Metric = Callable[[torch.Tensor, torch.Tensor], float]
DEFAULT_BATCH_SIZE = 256


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    metric: str | Metric = "top1",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> float:
    """Quality of ``model`` on labelled ``data``.

    Args:
        model: any module taking the inputs of ``data`` (float, compressed or deployed); it is
            run in eval mode without gradients and its train/eval mode is restored.
        data: labelled data in any form :func:`compactnn.train` takes (module docstring).
            Tensors are cut into ``batch_size`` chunks in stored order; an iterable of batches
            is used as given.
        metric: ``"top1"``: percent of samples whose argmax over the last dimension of the
            output (logits) equals the label. Or a function ``metric(outputs, labels) ->
            float`` giving the *mean* over one batch; the result is the mean of those batch
            values weighted by batch size, i.e. the mean over samples (exact for any metric
            that is itself a per-sample mean, such as accuracy or mean squared error).
        batch_size: samples per forward pass for tensor data.
        progress: show a progress bar over the batches.

    Returns:
        The metric as a float (top-1 in percent, 0..100).

    Raises:
        CompactnnError: data without labels, of an unsupported form, empty, with labels that
            are not class indices of the model's outputs (``"top1"``), or inputs the model
            cannot run on (the message names the input shape and the expected one).

    Example:
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> x, y = torch.tensor([[3.0, 1.0], [1.0, 3.0]]), torch.tensor([0, 0])
        >>> evaluate(model, (x, y))
        50.0
        >>> evaluate(model, {"x": x, "y": y}, metric=lambda out, lab: float(out.sum(1).mean()))
        4.0
    """
    score = _scorer(metric)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CompactnnError(f"evaluate(batch_size={batch_size!r}) must be a positive integer.")
    total, weight = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            bar = progress_bar(
                _batches(model, data, batch_size), desc="evaluate", progress=progress
            )
            for i, (x, y) in enumerate(bar):
                out = _run(model, x, i)
                total += score(out, y, i) * y.shape[0]
                weight += int(y.shape[0])
    finally:
        model.train(was_training)
    if weight == 0:
        raise CompactnnError("evaluation data is empty: pass at least one labelled sample.")
    return total / weight


def _batches(model: nn.Module, data: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(inputs, labels)`` batches: tensors (or keyword tensors such as ``input_ids`` and
    ``attention_mask``) in stored order, an iterable as given. Token ids that hold the
    model's padding id without an attention mask are warned about, once, on all the data
    (on the first batch of an iterable)."""
    if data is None or isinstance(data, torch.Tensor):
        what = "None" if data is None else f"a single tensor of shape {tuple(data.shape)}"
        raise CompactnnError(
            f"evaluation data has no labels ({what}): pass (inputs, labels) tensors, a dict "
            "with x and y, or batches of (inputs, labels)."
        )
    if isinstance(data, dict) and labelled_keys(data) is None:
        data = keyword_split(data) or keyword_split(data, "eval") or data
    if _keyword_pair(data):
        x, y = as_eval_data(data, what="evaluation data")
        warn_unmasked_padding(model, x)
        yield from zip(_split_dict(x, batch_size), torch.split(y, batch_size), strict=True)
        return
    try:
        train_data = as_train_data(data)
    except CompactnnError as exc:  # its messages speak of training; this is evaluation
        text = str(exc).replace("training data", "evaluation data")
        raise CompactnnError(text.replace("train()", "evaluate()")) from exc
    if train_data.loader is not None:
        for i, batch in enumerate(train_data.loader):
            x, y = eval_pair(batch, f"evaluation batch {i}")
            if i == 0:
                warn_unmasked_padding(model, x)
            yield x, y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
        return
    warn_unmasked_padding(model, train_data.x)
    yield from zip(
        torch.split(train_data.x, batch_size), torch.split(train_data.y, batch_size), strict=True
    )


def _keyword_pair(data: Any) -> bool:
    """Whether ``data`` is an ``(inputs, labels)`` pair whose inputs are keyword tensors."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], dict)
        and bool(data[0])
        and all(isinstance(v, torch.Tensor) for v in data[0].values())
    )


def _split_dict(x: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Keyword inputs cut into chunks of ``size`` rows, in stored order."""
    parts = {k: torch.split(v, size) for k, v in x.items()}
    return [dict(zip(parts, chunk, strict=True)) for chunk in zip(*parts.values(), strict=True)]


def _run(model: nn.Module, x: Any, i: int) -> torch.Tensor:
    """The model's main output on batch ``i``; a failure names the input and the expected one."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and dtype and x.dtype != dtype:
        x = x.to(dtype)  # e.g. float64 from numpy into a float32 model
    try:
        return main_output(call_model(model, x))
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = first_line(exc, 300)
        raise CompactnnError(
            f"the model cannot run on evaluation batch {i} ({describe(x)}): {first}. "
            f"Expected input: {expected_input_hint(model)}."
        ) from exc


def _scorer(metric: str | Metric) -> Callable[[torch.Tensor, Any, int], float]:
    """A function ``(outputs, labels, batch index) -> batch mean``."""
    if metric == "top1":
        return _top1
    if callable(metric):

        def user(out: torch.Tensor, y: Any, i: int) -> float:
            value = float(metric(out, y))
            if value != value:  # NaN: the mean would hide which batch
                raise CompactnnError(f"metric returned NaN on evaluation batch {i}.")
            return value

        return user
    raise CompactnnError(
        f"metric={metric!r} is not supported: pass 'top1' or a function "
        "metric(outputs, labels) -> float (the batch mean)."
    )


def _top1(out: torch.Tensor, y: Any, i: int) -> float:
    """Percent of rows of ``out`` (N, classes) whose argmax equals ``y`` (N,)."""
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
    if out.dim() != 2 or out.shape[0] != y.shape[0]:
        raise CompactnnError(
            f"top1 needs logits of shape (N, classes) for N labels; evaluation batch {i} gave "
            f"outputs of shape {tuple(out.shape)} for labels of shape {tuple(y.shape)}. Pass "
            "metric=your_function(outputs, labels) for other outputs."
        )
    check_labels(y, out.shape[1], where=f"evaluation batch {i}")
    return 100.0 * int((out.argmax(1) == y).sum()) / max(int(y.shape[0]), 1)


def guess_rate(labels: torch.Tensor) -> float:
    """Top-1 (percent) of always answering the most frequent label of ``labels``."""
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() == 0:
        return 0.0
    return 100.0 * int(torch.bincount(labels.long()).max()) / labels.numel()


GUESS_MARGIN = 0.1  # of the gap from the guess rate to 100%: 19.1% for 10 balanced classes


def no_better_than_guessing(
    top1: float, labels: torch.Tensor, where: str = "the data"
) -> str | None:
    """A warning when a *float* model's ``top1`` on ``labels`` is at or barely above always
    answering their most frequent label (it closes less than :data:`GUESS_MARGIN` of the gap
    from that rate to 100%), else None.

    A trained float model there almost always means the data is not what the model was
    trained on (pixels not normalised as in training, another label order, another data set:
    mnist-cnn scored 13.74% on sklearn's digits, the guess rate being 10.16%), so every
    compressed row measured on it would be noise.

    Example:
        >>> no_better_than_guessing(97.0, torch.tensor([0, 1, 2, 3])) is None
        True
        >>> no_better_than_guessing(0.0, torch.tensor([9, 9]), "--data d.st")[:45]
        'the float model scores 0.00% top-1 on --data '
    """
    rate = guess_rate(labels)
    if top1 > rate + GUESS_MARGIN * (100.0 - rate):
        return None
    return (
        f"the float model scores {top1:.2f}% top-1 on {where}, at or barely above always answering "
        f"its most frequent label ({rate:.2f}%): check that the inputs are preprocessed as in "
        "the model's training (e.g. normalised with the training mean and std) and that the "
        "labels are the model's class indices; every compressed row measured on this data is noise."
    )
