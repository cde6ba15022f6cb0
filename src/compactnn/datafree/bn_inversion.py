"""Batch-norm statistics inversion (ZeroQ, Cai et al., CVPR 2020; DeepInversion's priors).

A trained network's BatchNorm layers remember the mean ``mu_l`` and variance ``sigma_l^2`` of
their inputs over the training data. Inputs ``x`` are optimised (the network frozen, in eval
mode) so that each BN layer ``l`` sees a batch with the same statistics:

    L_BN(x) = sum_l ( ||mean_l(x) - mu_l||_2 + ||std_l(x) - sigma_l||_2 )

where ``mean_l``/``std_l`` are per channel over batch and space (biased). Added terms:
a class term ``CE(f(x), y)`` towards chosen labels (balanced over classes), or an entropy
term (the batch-mean prediction's negative entropy, which spreads the classes), and input
priors: total variation ``TV(x) = mean (x[h+1] - x[h])^2 + mean (x[w+1] - x[w])^2`` and
``l2 = mean x^2``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.progress import bar as progress_bar
from compactnn.datafree.common import (
    BNStats,
    GeneratedData,
    Timer,
    bn_statistics_loss,
    check_classifier,
    check_count,
    check_input_shape,
    check_module,
    check_steps,
    frozen_copy,
)
from compactnn.errors import CompactnnError

__all__ = ["BNStats", "bn_statistics_loss", "invert_bn", "negative_entropy", "total_variation"]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertical plus horizontal neighbours of ``(N, C, H, W)``."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()
    return dh + dw


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``sum_c p_c log p_c`` of the batch-mean softmax ``p`` (minimised: balanced classes)."""
    p = F.softmax(logits, dim=1).mean(0)
    return (p * torch.log(p.clamp_min(1e-12))).sum()


def invert_bn(
    model: nn.Module,
    n: int,
    *,
    input_shape,
    steps: int = 200,
    lr: float = 0.1,
    batch_size: int = 64,
    class_weight: float = 1.0,
    objective: str = "class",
    tv_weight: float = 1e-2,
    l2_weight: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> GeneratedData:
    """``n`` inputs whose BN statistics match ``model``'s running statistics.

    Args:
        model: a trained classifier with BatchNorm layers (not changed).
        n: how many inputs to generate.
        input_shape: per-sample shape ``(C, H, W)``.
        steps: Adam steps per batch (at least 1).
        lr: Adam learning rate on the inputs.
        batch_size: inputs optimised together (BN statistics are batch statistics).
        class_weight: weight of the class or entropy term (0: statistics only, as ZeroQ).
        objective: ``"class"`` (CE towards balanced labels ``i mod C``) or ``"entropy"``.
        tv_weight, l2_weight: weights of the total-variation and l2 input priors.
        seed: the starting noise.
        progress: a progress bar.

    Example:
        >>> data = invert_bn(model, 256, input_shape=(1, 28, 28))  # doctest: +SKIP
        >>> qmodel = compactnn.compress(model, "w4a8", calib_data=data)  # doctest: +SKIP
    """
    if objective not in ("class", "entropy"):
        raise CompactnnError(f"objective={objective!r}: use 'class' or 'entropy'.")
    check_module(model)
    check_count(n)
    steps = check_steps(steps, 200)
    shape = check_input_shape(input_shape)
    teacher = frozen_copy(model)
    stats = BNStats(teacher)
    gen = torch.Generator().manual_seed(seed)
    classes = check_classifier(teacher, torch.randn(2, *shape, generator=gen))
    stats.reset()
    xs, ys = [], []
    bar = progress_bar(total=-(-n // batch_size) * steps, desc="bn-inversion", progress=progress)
    with Timer() as timer:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.randn(b, *shape, generator=gen).requires_grad_(True)
            target = (torch.arange(start, start + b) % classes).long()
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                logits = teacher(x)
                term = (
                    F.cross_entropy(logits, target)
                    if objective == "class"
                    else negative_entropy(logits)
                )
                loss = stats.loss() + class_weight * term
                loss = loss + tv_weight * total_variation(x) + l2_weight * x.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                if progress and (bar.n % 10 == 1 or bar.n == bar.total):  # shown at once
                    bar.set_postfix(loss=f"{loss.item():.3g}", refresh=bar.n == 1)
            with torch.no_grad():
                xs.append(x.detach())
                ys.append(teacher(x).argmax(1))
                stats.reset()
    bar.close()
    stats.remove()
    x = torch.cat(xs)
    settings = {"method": "bn-inversion", "steps": steps, "seed": seed}
    cost = timer.cost("bn-inversion", n=n, steps=steps)
    return GeneratedData(x, torch.cat(ys), cost, settings=settings)
