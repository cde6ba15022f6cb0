"""``generate(model, n, method=...)``: synthetic inputs for calibration or training."""

from __future__ import annotations

from torch import nn

from compactnn.datafree.bn_inversion import invert_bn
from compactnn.datafree.common import (
    GeneratedData,
    check_count,
    check_input_shape,
    check_module,
    check_steps,
)
from compactnn.datafree.dafl import sample, train_dafl
from compactnn.errors import CompactnnError

METHODS = ("bn-inversion", "dafl")


def generate(
    model: nn.Module,
    n: int = 256,
    *,
    input_shape=None,
    method: str = "bn-inversion",
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> GeneratedData:
    """``n`` synthetic inputs for ``model`` without its training data.

    Args:
        model: a trained classifier (not changed). ``"bn-inversion"`` needs BatchNorm layers;
            ``"dafl"`` needs a final ``nn.Linear`` head.
        n: number of inputs (at least 1).
        input_shape: per-sample shape ``(C, H, W)`` (or ``"C,H,W"``); required unless
            ``model`` has an ``input_shape`` attribute.
        method: ``"bn-inversion"`` (ZeroQ-style statistics matching with a class term) or
            ``"dafl"`` (a DAFL generator trained against the model with the paper's loss,
            no BN-statistics term, then sampled).
        steps: optimisation steps, at least 1 (None: 200 per batch for inversion, 1,000
            for DAFL).
        seed: the random start.
        progress: progress bars.

    Returns:
        :class:`GeneratedData`: pass it as ``calib_data=`` to ``compactnn.compress`` or as
        the data of ``compactnn.train`` (labels: the model's top-1). ``.cost`` holds the
        seconds and peak memory of generation.

    Example:
        >>> data = generate(model, 256, input_shape=(1, 28, 28))          # doctest: +SKIP
        >>> q = compactnn.compress(model, "w4a8", calib_data=data)        # doctest: +SKIP
    """
    check_module(model)
    check_count(n)
    if method not in METHODS:
        raise CompactnnError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if method == "bn-inversion":
        steps = check_steps(steps, 200)
        return invert_bn(
            model, n, input_shape=input_shape, steps=steps, seed=seed, progress=progress
        )
    if method == "dafl":
        check_input_shape(input_shape)  # before the generator trains
        steps = check_steps(steps, 1000)
        gen, _, cost = train_dafl(  # the paper's loss (bn=0): what the calibration measured
            model,
            None,
            input_shape=input_shape,
            steps=steps,
            bn=0.0,
            seed=seed,
            progress=progress,
        )
        data = sample(gen, model, n, seed=seed)
        data.cost = {**cost, "seconds": round(cost["seconds"] + data.cost["seconds"], 3), "n": n}
        data.settings = {"method": "dafl", "steps": steps, "seed": seed}
        return data
    raise AssertionError(method)  # unreachable: checked above
