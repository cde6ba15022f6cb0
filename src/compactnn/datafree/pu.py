"""Positive-unlabeled compression (Xu, Wang et al., NeurIPS 2019).

Given a few labeled in-distribution images ``P`` and a large unlabeled pool ``U`` that mixes
in- and out-of-distribution images, a PU classifier ``g`` on the teacher's penultimate
features is trained with the non-negative PU risk (nnPU, Kiryo et al., 2017) and the sigmoid
loss ``l(z) = sigmoid(-z)``:

    R(g) = pi * E_P[l(g)] + max(0, E_U[l(-g)] - pi * E_P[l(-g)])

with class prior ``pi`` (the in-distribution share of ``U``). When the negative part is
below zero the step descends on ``-(negative part)`` instead (nnPU's correction). Pool samples
with ``g(x) > 0`` are selected; the student is then distilled on ``P`` plus the selection
with the robust KD of the paper: class weights ``w_c ∝ 1 / sum_x softmax_T(x)_c`` (summing
to ``C``), perturbed by ``U(0, eps)`` noise, and per batch the largest loss over the perturbed
weight vectors, each sample weighted by ``w[argmax T(x)]`` (temperature 1).

The paper's attention-based multi-scale feature extractor is replaced by a small MLP on the
teacher's penultimate features (documented simplification).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.progress import bar
from compactnn.core.seeding import keeps_global_rng, reseed
from compactnn.datafree.common import FeatureTap, Timer, classifier_head, frozen_copy, logits_of
from compactnn.errors import CompactnnError


def nnpu_risk(g_p: torch.Tensor, g_u: torch.Tensor, prior: float) -> tuple[torch.Tensor, ...]:
    """``(risk, objective)``: the nnPU risk and what to descend on (nnPU's correction).

    Example:
        >>> r, obj = nnpu_risk(torch.zeros(3), torch.zeros(5), 0.5)  # every l(.) = 1/2
        >>> float(r), float(obj)
        (0.5, 0.5)
    """
    loss = lambda z: torch.sigmoid(-z)  # noqa: E731
    positive = prior * loss(g_p).mean()
    negative = loss(-g_u).mean() - prior * loss(-g_p).mean()
    risk = positive + negative.clamp_min(0.0)
    objective = positive + negative if negative >= 0 else -negative
    return risk, objective


def teacher_features(teacher: nn.Module, x: torch.Tensor, batch: int = 256):
    """``(features, logits)`` of ``teacher`` on ``x``: the head's input and its output."""
    teacher = frozen_copy(teacher)
    tap = FeatureTap(classifier_head(teacher)[1])
    feats, logits = [], []
    with torch.no_grad():
        for xb in x.split(batch):
            logits.append(teacher(xb))
            feats.append(tap.value.flatten(1))
    tap.remove()
    return torch.cat(feats), torch.cat(logits)


@keeps_global_rng  # seeds torch for its own classifier; the caller's stream is kept
def select_in_distribution(
    teacher: nn.Module,
    x_labeled: torch.Tensor,
    x_pool: torch.Tensor,
    *,
    prior: float = 0.5,
    epochs: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Boolean mask over ``x_pool``: the samples the nnPU classifier calls in-distribution.

    Args:
        teacher: the trained classifier whose penultimate features the PU classifier reads.
        x_labeled: the few labeled in-distribution inputs ``P``.
        x_pool: the unlabeled pool ``U``.
        prior: ``pi``, the share of in-distribution samples in the pool, in (0, 1).
        epochs: full-batch Adam steps of the PU classifier.
        lr: its learning rate.
        seed: initialisation.
        progress: a progress bar.
    """
    if not 0.0 < prior < 1.0:
        raise CompactnnError(f"prior={prior!r}: the in-distribution share must lie in (0, 1).")
    if x_labeled.shape[1:] != x_pool.shape[1:]:
        raise CompactnnError(
            f"labeled inputs {tuple(x_labeled.shape[1:])} and pool inputs "
            f"{tuple(x_pool.shape[1:])} differ in shape; resize the pool like the labeled data."
        )
    reseed(seed)
    f_p, _ = teacher_features(teacher, x_labeled)
    f_u, _ = teacher_features(teacher, x_pool)
    mu, sd = f_u.mean(0), f_u.std(0) + 1e-6  # standardised on the pool
    f_p, f_u = (f_p - mu) / sd, (f_u - mu) / sd
    g = nn.Sequential(nn.Linear(f_p.shape[1], 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(g.parameters(), lr=lr, weight_decay=1e-4)
    for _ in bar(range(epochs), desc="nnPU", progress=progress, leave=False):
        _risk, objective = nnpu_risk(g(f_p).squeeze(1), g(f_u).squeeze(1), prior)
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
    with torch.no_grad():
        return g(f_u).squeeze(1) > 0


def robust_class_weights(teacher_logits: torch.Tensor) -> torch.Tensor:
    """``w_c ∝ 1 / sum_x softmax(T(x))_c``, normalised to sum to ``C``."""
    mass = F.softmax(teacher_logits, 1).sum(0)
    w = 1.0 / mass.clamp_min(1e-6)
    return w * (w.numel() / w.sum())


def robust_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    perturbations: torch.Tensor,
) -> torch.Tensor:
    """The largest, over ``weights + perturbations[k]``, sample-weighted KL(T || S) (T=1).

    Args:
        weights: class weights ``(C,)``.
        perturbations: ``(K, C)`` noise added to the weights (K perturbed vectors).
    """
    log_s = F.log_softmax(student_logits, 1)
    log_t = F.log_softmax(teacher_logits.detach(), 1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)  # (N,)
    cls = teacher_logits.argmax(1)
    vectors = torch.cat([weights[None], weights[None] + perturbations])  # (K+1, C)
    losses = (vectors[:, cls] * kl[None]).mean(1)  # (K+1,)
    return losses.max()


@keeps_global_rng  # seeds torch for its own shuffles; the caller's stream is kept
def pu_distill(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    eps: float = 0.1,
    perturbations: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """Distil ``student`` (in place) from ``teacher`` on ``x`` with the robust KD loss."""
    reseed(seed)
    teacher = frozen_copy(teacher)
    with torch.no_grad():
        t_all = torch.cat([teacher(b) for b in x.split(256)])
    w = robust_class_weights(t_all)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    steps = epochs * -(-x.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    student.train()
    with Timer() as timer:
        for _ in bar(range(epochs), desc="robust KD", progress=progress, leave=False):
            for idx in torch.randperm(x.shape[0]).split(batch_size):
                noise = torch.rand(perturbations, w.numel()) * eps
                loss = robust_kd_loss(logits_of(student(x[idx])), t_all[idx], w, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return student.eval(), timer.cost("pu-distill", samples=int(x.shape[0]))


def pu_compress(
    student: nn.Module,
    teacher: nn.Module,
    x_labeled: torch.Tensor,
    x_pool: torch.Tensor,
    *,
    prior: float = 0.5,
    epochs: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """Select the pool's in-distribution part (nnPU) and distil on it plus ``x_labeled``.

    Returns:
        ``(student, info)``: the student trained in place, and ``info`` with ``selected``
        (the boolean mask over the pool), seconds and peak memory.

    Example:
        >>> student, info = pu_compress(small, teacher, x_few, x_pool)  # doctest: +SKIP
    """
    with Timer() as timer:
        mask = select_in_distribution(
            teacher, x_labeled, x_pool, prior=prior, seed=seed, progress=progress
        )
    x = torch.cat([x_labeled, x_pool[mask]])
    student, cost = pu_distill(student, teacher, x, epochs=epochs, seed=seed, progress=progress)
    info = timer.cost("pu-select", selected=mask, n_selected=int(mask.sum()))
    info["distill_seconds"] = cost["seconds"]
    return student, info
