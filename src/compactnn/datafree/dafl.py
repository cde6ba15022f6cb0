"""DAFL: data-free learning of student networks (Chen, Wang et al., ICCV 2019).

A generator ``G(z)``, ``z ~ N(0, I)``, is trained against the frozen teacher ``T`` (which
plays the discriminator) with three terms on a batch of ``x = G(z)``:

    L_G = oh * CE(T(x), argmax T(x))          one-hot: confident teacher outputs
          - a * mean |f_T(x)|                 activation: large penultimate features
          + ie * sum_c pbar_c log pbar_c       information entropy: balanced classes

(``pbar`` is the batch-mean softmax; minimising ``sum p log p`` maximises its entropy).
A term that is *not* DAFL's (``bn > 0``), from the generator-based data-free quantization
that followed it (GDFQ, Xu et al., ECCV 2020; DeepInversion's statistics), matches the
teacher's BatchNorm running statistics on the generated batch:

    L_G += bn * sum_l ( ||mean_l(x) - mu_l||_2 + ||std_l(x) - sigma_l||_2 )

It is on by default (``bn=1`` when the teacher has BatchNorm running statistics): on the
mnist-cnn teacher the paper's loss alone left a half-width student at 92.9 % after 3,000
steps, the BN term 97.6 ± 0.3 % (3 seeds) at the same cost (docs/data-free.md). ``bn=0``
is the paper's loss.
The student ``S`` is distilled on the same batch, ``KL(T(x) || S(x))``, both optimisers
stepping together.

**Replay variant** (``replay=True``), in the spirit of small-scale data-free KD (SSD-KD,
Liu, Wang, Yao et al., CVPR 2024), whose exact formulas were not available: after a short
generator warm-up only a small buffer of generated images is kept; the student trains on
batches drawn from it with priority proportional to the current teacher-student KL of each
sample (a fixed rule, not SSD-KD's reinforcement-learned policy), and the buffer is
refreshed with a few new samples per step. It is *not* SSD-KD.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.progress import bar as progress_bar
from compactnn.core.seeding import keeps_global_rng, reseed
from compactnn.datafree.common import (
    BNStats,
    FeatureTap,
    GeneratedData,
    Timer,
    check_classifier,
    check_count,
    check_input_shape,
    check_module,
    check_steps,
    classifier_head,
    frozen_copy,
    has_bn_stats,
    logits_of,
)
from compactnn.distill.kd import kd_loss
from compactnn.errors import CompactnnError


def dafl_generator_loss(
    logits: torch.Tensor,
    features: torch.Tensor,
    oh: float = 1.0,
    a: float = 0.1,
    ie: float = 5.0,
) -> torch.Tensor:
    """DAFL's generator loss on teacher ``logits (N, C)`` and penultimate ``features``.

    Example:
        >>> logits = torch.zeros(4, 2)  # uniform: CE = log 2, balanced: sum p log p = -log 2
        >>> round(float(dafl_generator_loss(logits, torch.zeros(4, 3), 1, 0, 1)), 6)
        0.0
    """
    one_hot = F.cross_entropy(logits, logits.argmax(1))
    activation = -features.abs().mean()
    p = F.softmax(logits, dim=1).mean(0)
    entropy = (p * torch.log(p.clamp_min(1e-12))).sum()
    return oh * one_hot + a * activation + ie * entropy


class Generator(nn.Module):
    """DAFL's image generator: linear -> (128, H/4, W/4), two upsample-conv-BN stages.

    The output passes through ``tanh`` and a non-affine BatchNorm, as in DAFL, so its
    per-channel statistics resemble normalised images.
    """

    def __init__(self, input_shape, latent: int = 100, width: int = 32) -> None:
        super().__init__()
        c, h, w = check_input_shape(input_shape)
        if h % 4 or w % 4:
            raise CompactnnError(
                f"the DAFL generator makes images whose sides are multiples of 4; "
                f"input_shape={tuple(input_shape)} is not. Generate inputs by batch-norm "
                "inversion instead: compactnn.datafree.generate(model, n, "
                f"input_shape={tuple(input_shape)}, method='bn-inversion')."
            )
        self.latent, self.hw = latent, (h // 4, w // 4)
        self.fc = nn.Linear(latent, 2 * width * self.hw[0] * self.hw[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, c, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(c, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], -1, *self.hw)  # (N, 2W, H/4, W/4)
        return self.body(x)  # (N, C, H, W)


def _setup(teacher: nn.Module, input_shape, latent: int, width: int, seed: int, bn: float):
    reseed(seed)
    teacher = frozen_copy(teacher)
    gen = Generator(input_shape, latent, width)
    check_classifier(teacher, torch.randn(2, *check_input_shape(input_shape)))
    tap = FeatureTap(classifier_head(teacher)[1])
    tap.stats = BNStats(teacher) if bn > 0 else None  # raises without BN layers
    return teacher, gen, tap


def _generator_step(teacher, gen, tap, opt_g, batch, weights, bn):
    x = gen(torch.randn(batch, gen.latent))
    if tap.stats is not None:
        tap.stats.reset()
    logits = teacher(x)
    loss = dafl_generator_loss(logits, tap.value, *weights)
    if tap.stats is not None:
        loss = loss + bn * tap.stats.loss()
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    return x.detach(), logits.detach(), loss.detach()


@keeps_global_rng  # seeds torch (_setup) for its own noise; the caller's stream is kept
def train_dafl(
    teacher: nn.Module,
    student: nn.Module | None,
    *,
    input_shape,
    steps: int = 1000,
    batch_size: int = 128,
    lr_g: float = 1e-3,
    lr_s: float = 1e-2,
    weights: tuple[float, float, float] = (1.0, 0.1, 5.0),
    latent: int = 100,
    width: int = 32,
    bn: float | None = None,
    replay: bool = False,
    buffer_size: int = 512,
    warmup: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Generator, nn.Module | None, dict]:
    """Train DAFL's generator (and, given one, the student in place) against ``teacher``.

    Args:
        teacher: a trained classifier with a final ``nn.Linear`` head (not changed).
        student: the student to distil (trained in place), or None for the generator only.
        input_shape: per-sample input shape ``(C, H, W)`` (sides multiples of 4).
        steps: joint optimisation steps (at least 1).
        batch_size: generated images per step.
        lr_g, lr_s: Adam learning rates of generator and student (the student's decays on a
            cosine schedule; 1e-2 converges in a few hundred steps, the paper's 2e-3 was
            set for about 24,000 steps of 512).
        weights: ``(oh, a, ie)`` of :func:`dafl_generator_loss`.
        latent: size of ``z``.
        width: the generator's narrowest channel count (its widest is twice that).
        bn: weight of an added batch-norm statistics term ``bn * L_BN(x)`` on the generator
            (module docstring; not DAFL's; 0: the paper's loss). None (default): 1.0 when the
            teacher has BatchNorm layers with running statistics, else 0.
        replay: the replay-buffer variant (module docstring): generator updates stop after
            ``warmup`` steps; the student trains on a ``buffer_size`` buffer.
        seed: initialisation and noise.
        progress: a progress bar.

    Returns:
        ``(generator, student, cost)`` with ``cost`` seconds, peak memory, images generated.
    """
    check_module(teacher, "teacher")
    if student is not None:
        check_module(student, "student")
    steps = check_steps(steps, 1000)
    if replay and not 1 <= warmup < steps:
        raise CompactnnError(
            f"replay needs 1 <= warmup < steps, got warmup={warmup}, steps={steps}."
        )
    if bn is None:
        bn = 1.0 if has_bn_stats(teacher) else 0.0
    if bn < 0:
        raise CompactnnError(f"bn={bn!r}: the BN-statistics weight must be >= 0 (0: off).")
    teacher, gen, tap = _setup(teacher, input_shape, latent, width, seed, bn)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr_g)
    opt_s = sched = None
    if student is not None:
        student.train()
        opt_s = torch.optim.Adam(student.parameters(), lr=lr_s)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=max(steps, 1))
    buffer = None
    made = 0
    bar = progress_bar(range(steps), desc="dafl", progress=progress, leave=False)
    with Timer() as timer:
        for step in bar:
            if not replay or step < warmup:
                x, t, loss_g = _generator_step(teacher, gen, tap, opt_g, batch_size, weights, bn)
                made += batch_size
                if progress and (step % 10 == 0 or step == steps - 1):  # shown at once
                    bar.set_postfix(loss=f"{float(loss_g):.3g}", refresh=step == 0)
            else:
                x, t, buffer, fresh = _replay_batch(teacher, gen, student, buffer, batch_size)
                made += fresh
            if replay and step == warmup - 1:
                if tap.stats is not None:  # the generator is final: no more statistics
                    tap.stats.remove()
                    tap.stats = None
                buffer = _fill(teacher, gen, buffer_size)
                made += buffer_size
            if student is not None:
                loss = kd_loss(logits_of(student(x)), t, 1.0)
                opt_s.zero_grad(set_to_none=True)
                loss.backward()
                opt_s.step()
                sched.step()
    tap.remove()
    if tap.stats is not None:
        tap.stats.remove()
    gen.eval()
    if student is not None:
        student.eval()
    return gen, student, timer.cost("dafl-replay" if replay else "dafl", generated=made)


def _fill(teacher, gen, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen.eval()
    with torch.no_grad():
        x = gen(torch.randn(n, gen.latent))
        return x, teacher(x)


def _replay_batch(teacher, gen, student, buffer, batch: int):
    """A batch from the buffer drawn with priority ~ teacher-student KL; 1/8 refreshed."""
    bx, bt = buffer
    with torch.no_grad():
        log_s = F.log_softmax(logits_of(student(bx)), 1)
        log_t = F.log_softmax(bt, 1)
        kl = (log_t.exp() * (log_t - log_s)).sum(1).clamp_min(1e-6)
    idx = torch.multinomial(kl / kl.sum(), min(batch, bx.shape[0]), replacement=False)
    fresh = max(1, bx.shape[0] // 64)
    nx, nt = _fill(teacher, gen, fresh)
    old = kl.argsort()[:fresh]  # the easiest samples leave the buffer
    bx, bt = bx.clone(), bt.clone()
    bx[old], bt[old] = nx, nt
    return bx[idx], bt[idx], (bx, bt), fresh


@keeps_global_rng
def sample(gen: Generator, teacher: nn.Module, n: int, seed: int = 0) -> GeneratedData:
    """``n`` images from a trained generator, labelled by the teacher's top-1."""
    check_count(n)
    reseed(seed)
    gen.eval()
    with Timer() as timer, torch.no_grad():
        x = torch.cat([gen(torch.randn(b.numel(), gen.latent)) for b in torch.arange(n).split(256)])
        y = frozen_copy(teacher)(x).argmax(1)
    return GeneratedData(x, y, timer.cost("dafl-sample", n=n))
