"""Benchmark section ``datafree``: compression without the training data (issue 20).

Tables: (1) DAFL half-width student from the ``mnist-cnn`` teacher with no real data vs
distillation on Gaussian noise vs distillation on the real training images (ceiling), plus
DAFL with an added BN-statistics term and its replay-buffer variant; (2) ``w4a8`` and
``w4a4-qdrop`` calibrated on generated (batch-norm inversion, DAFL) vs real images on
``mnist-cnn`` and ``digits-resnet``;
(3) positive-unlabeled compression with 10 labeled images per class and a pool that is half
out-of-distribution (8x8 digits upsampled, noise patterns) vs labeled-only vs an oracle;
(4) NORM (on the last-stage maps, as released) and DCM vs plain logits distillation for a
weak (4, 8, 16) and a twice-wider student; (5) generation cost.
Every cell is the mean over seeds (± the sample std when there are several).

Run: ``OMP_WAIT_POLICY=PASSIVE python -m compactnn.bench.datafree [--quick]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import compactnn
from compactnn.data import load_digits8, load_mnist
from compactnn.datafree import distill_on, generate, pu_compress, train_dafl
from compactnn.datafree.pu import pu_distill
from compactnn.distill.dcm import DCMDistiller
from compactnn.distill.kd import kd_loss
from compactnn.distill.norm import NormDistiller
from compactnn.models import load_reference
from compactnn.models.mnist_cnn import conv_bn_relu

THREADS = 1
HALF = (8, 16, 32, 32, 32)  # half of mnist-cnn's widths
STRIDES = (1, 2, 2, 1, 1)
LR_S = 1e-2  # the students' Adam learning rate (train_dafl's default), every arm alike
DAFL_ARMS = {"dafl": 0.0, "dafl-bn": 1.0, "dafl-bn-replay": 1.0}  # arm -> BN-term weight


class SmallCNN(nn.Module):
    """mnist-cnn's layout at other widths: conv-BN-ReLU blocks, global pool, linear head."""

    def __init__(self, widths=HALF, strides=STRIDES) -> None:
        super().__init__()
        blocks, c = [], 1
        for w, s in zip(widths, strides, strict=True):
            blocks.append(conv_bn_relu(c, w, s))
            c = w
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


# ---- (1) DAFL ---------------------------------------------------------------------------


def dafl_rows(ref, split, seeds, steps: int, costs: dict) -> list[str]:
    """Half-width students distilled by DAFL / replay DAFL / noise / real data."""
    arms: dict[str, list[float]] = {a: [] for a in ("real", "noise", *DAFL_ARMS)}
    for seed in seeds:
        for arm in arms:
            torch.manual_seed(seed)
            student = SmallCNN()
            t0 = time.perf_counter()
            if arm in DAFL_ARMS:
                _, _, cost = train_dafl(
                    ref.model,
                    student,
                    input_shape=(1, 28, 28),
                    steps=steps,
                    batch_size=64,
                    lr_s=LR_S,
                    bn=DAFL_ARMS[arm],
                    replay=arm == "dafl-bn-replay",
                    warmup=steps // 4,
                    seed=seed,
                    progress=False,
                )
                costs.setdefault(f"{arm} ({steps} steps)", cost)
            else:
                gen = torch.Generator().manual_seed(seed)
                x_train = split.x_train

                def batch(_step, gen=gen, arm=arm, x_train=x_train):
                    if arm == "noise":
                        return torch.randn(64, 1, 28, 28, generator=gen)
                    return x_train[torch.randint(0, x_train.shape[0], (64,), generator=gen)]

                distill_on(student, ref.model, batch, steps=steps, lr=LR_S, progress=False)
            arms[arm].append(_top1(student, split.x_test, split.y_test))
            print(
                f"dafl {arm} seed {seed}: {arms[arm][-1]:.2f} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
    teacher = ref.evaluate(ref.model)
    noise = statistics.mean(arms["noise"])
    names = {
        "dafl": "DAFL generator (no data; the paper's loss)",
        "dafl-bn": "DAFL + BN-statistics term (bn = 1; not the paper's)",
        "dafl-bn-replay": "the same, replay buffer (SSD-KD-style, simplified)",
    }
    rows = [
        f"Teacher mnist-cnn {teacher:.2f}% top-1; students {HALF} channels, {steps} steps of "
        f"batch 64 each, Adam {LR_S:g} with a cosine schedule, KD at T=1.",
        "",
        "| student trained on | top-1 % | target |",
        "|---|---|---|",
        f"| real training images (ceiling) | {_cell(arms['real'])} | |",
        f"| Gaussian noise | {_cell(arms['noise'])} | |",
    ]
    for arm, name in names.items():
        m = statistics.mean(arms[arm])
        rows.append(
            f"| {name} | {_cell(arms[arm])} | ≥ 95: {_met(m >= 95)}; "
            f"far above noise (≥ 10 pt): {_met(m - noise >= 10)} |"
        )
    return rows


# ---- (2) data-free calibration ------------------------------------------------------------


def calib_rows(seeds, quick: bool, costs: dict) -> list[str]:
    rows = [
        "| model | recipe | float | real calib | BN-inversion calib | DAFL calib | noise calib "
        "| gap (real − BN) | target (≤ 1 pt) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape in (("mnist-cnn", (1, 28, 28)), ("digits-resnet", (1, 8, 8))):
        ref = load_reference(name, progress=False)
        gens: dict[str, list] = {"bn": [], "dafl": [], "noise": []}
        for seed in seeds:
            bn = generate(
                ref.model,
                256,
                input_shape=shape,
                steps=100 if quick else 200,
                seed=seed,
                progress=False,
            )
            costs.setdefault(f"bn-inversion {name} (256 images)", bn.cost)
            gens["bn"].append(bn)
            if shape[1] % 4 == 0 and shape[2] % 4 == 0:
                dafl = generate(
                    ref.model,
                    256,
                    input_shape=shape,
                    method="dafl",
                    steps=150 if quick else 1000,
                    seed=seed,
                    progress=False,
                )
                costs.setdefault(f"dafl {name} (generator + 256 images)", dafl.cost)
                gens["dafl"].append(dafl)
            gens["noise"].append(
                torch.randn(256, *shape, generator=torch.Generator().manual_seed(seed))
            )
        for recipe in ("w4a8", "w4a4-qdrop"):

            def score(calib, ref=ref, recipe=recipe):
                q = compactnn.compress(ref.model, recipe, calib_data=calib, progress=False)
                return ref.evaluate(q)

            real = score(ref.calib)
            res = {k: [score(c) for c in v] for k, v in gens.items()}
            gap = real - statistics.mean(res["bn"])
            dafl = _cell(res["dafl"]) if res["dafl"] else "n/a (8x8)"
            rows.append(
                f"| {name} | {recipe} | {ref.evaluate(ref.model):.2f} | {real:.2f} | "
                f"{_cell(res['bn'])} | {dafl} | {_cell(res['noise'])} | {gap:+.2f} | "
                f"{_met(gap <= 1.0)} |"
            )
            print(rows[-1], file=sys.stderr)
    return rows


# ---- (3) positive-unlabeled compression ---------------------------------------------------


def _ood_pool(n: int, seed: int) -> torch.Tensor:
    """Half upsampled 8x8 digits, half noise patterns, scaled like the MNIST inputs."""
    gen = torch.Generator().manual_seed(seed)
    d8 = load_digits8().x_train[: n // 2]
    up = F.interpolate(d8, size=(28, 28), mode="bilinear", align_corners=False)
    noise = torch.rand(n - n // 2, 1, 7, 7, generator=gen)
    noise = F.interpolate(noise, size=(28, 28), mode="nearest") * 3 - 0.5  # blocky patterns
    return torch.cat([up, noise])


def pu_rows(ref, split, seeds, steps: int) -> list[str]:
    arms: dict[str, list[float]] = {"labeled": [], "pu": [], "oracle": []}
    precision, recall = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(split.x_train.shape[0], generator=gen)
        y = split.y_train[order]
        few = torch.cat([order[y == c][:10] for c in range(10)])
        rest = order[~torch.isin(order, few)][:1000]
        pool = torch.cat([split.x_train[rest], _ood_pool(1000, seed)])
        is_in = torch.arange(2000) < 1000
        x_few = split.x_train[few]
        for arm in arms:
            torch.manual_seed(seed)
            student = SmallCNN()
            if arm == "pu":
                _, info = pu_compress(
                    student, ref.model, x_few, pool, prior=0.5, epochs=1, seed=seed, progress=False
                )
                sel = info["selected"]
                precision.append(100 * float(is_in[sel].float().mean()) if sel.any() else 0.0)
                recall.append(100 * float(sel[is_in].float().mean()))
                data = torch.cat([x_few, pool[sel]])
                torch.manual_seed(seed)
                student = SmallCNN()
            else:
                data = x_few if arm == "labeled" else torch.cat([x_few, pool[is_in]])
            epochs = max(1, steps * 64 // data.shape[0])
            pu_distill(student, ref.model, data, epochs=epochs, seed=seed, progress=False)
            arms[arm].append(_top1(student, split.x_test, split.y_test))
            print(f"pu {arm} seed {seed}: {arms[arm][-1]:.2f}", file=sys.stderr)
    lab, pu, ora = (statistics.mean(arms[k]) for k in ("labeled", "pu", "oracle"))
    return [
        "10 labeled images per class; pool of 2,000: 1,000 MNIST training images and 1,000 "
        "out-of-distribution (500 upsampled 8x8 digits, 500 blocky noise patterns); nnPU on "
        f"the teacher's penultimate features (prior 0.5); robust KD, about {steps} steps of 64.",
        "",
        "| student distilled on | top-1 % | target |",
        "|---|---|---|",
        f"| labeled images only (100) | {_cell(arms['labeled'])} | |",
        f"| labeled + PU-selected pool | {_cell(arms['pu'])} | above labeled-only: "
        f"{_met(pu > lab)}; near oracle (≤ 1 pt): {_met(ora - pu <= 1.0)} |",
        f"| labeled + true in-distribution pool (oracle) | {_cell(arms['oracle'])} | |",
        "",
        f"PU selection: precision {_cell(precision)} %, recall {_cell(recall)} %.",
    ]


# ---- (4) NORM and DCM -------------------------------------------------------------------


WEAK = (4, 8, 16)  # the deliberately weak student (mnist-cnn has 16, 32, 64, 64, 64)
WIDER = (8, 16, 32)  # twice as wide: capacity less starved
NORM_R = 0.1  # NORM's cross-entropy weight r (its released defaults: r = 0.1, alpha = 1, beta = 0)
KD_ARMS = {
    "ce": "cross entropy only",
    "kd": "logits KD (T=4, 0.5 CE + 0.5 KD)",
    "norm": f"NORM (N=4, last-stage maps, SFT with BN; {NORM_R} CE + L_NORM), merged",
    "norm-kd": "NORM (maps) + logits KD (0.5 CE + 0.5 KD + L_NORM), merged",
    "norm-head": f"NORM on the pooled head input (no BN; {NORM_R} CE + L_NORM), merged",
    "dcm": "DCM (2 + 2 aux heads, T=1)",
}


def _fit_weak(arm: str, teacher: nn.Module, x, y, epochs: int, seed: int, widths=WEAK):
    """One student of ``widths`` channels (strides 1, 2, 2) trained with loss ``arm``."""
    torch.manual_seed(seed)
    student = SmallCNN(widths, (1, 2, 2))
    extra_params: list = []
    norm = dcm = None
    if arm in ("norm", "norm-kd"):  # the paper's form: the last stages' 7x7 maps
        maps = {"student_feature": "features", "teacher_feature": "features", "probe": x[:2]}
        norm = NormDistiller(student, teacher, n=4, **maps)
    if arm == "norm-head":
        norm = NormDistiller(student, teacher, n=4)
    if norm is not None:
        extra_params = list(norm.parameters())
    if arm == "dcm":
        dcm = DCMDistiller(
            student, teacher, ["features.0", "features.1"], ["features.1", "features.3"], x[:2]
        )
        extra_params = list(dcm.heads.parameters())
    opt = torch.optim.Adam([*student.parameters(), *extra_params], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        student.train()
        for idx in torch.randperm(x.shape[0], generator=gen).split(64):
            xb, yb = x[idx], y[idx]
            logits = student(xb)
            with torch.no_grad() if dcm is None else torch.enable_grad():
                t = teacher(xb)
            ce = F.cross_entropy(logits, yb)
            if arm == "ce":
                loss = ce
            elif arm == "dcm":
                loss = dcm.loss(logits, t, yb)
            elif arm in ("norm", "norm-head"):  # NORM's released defaults: r CE + L_NORM
                loss = NORM_R * ce + norm.loss()
            else:
                loss = 0.5 * ce + 0.5 * kd_loss(logits, t, 4.0)
                if norm is not None:
                    loss = loss + norm.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if norm is not None:
        student = norm.merge()
        norm.remove()
    if dcm is not None:
        dcm.remove()
    return student.eval()


def kd_rows(ref, split, seeds, epochs: int) -> list[str]:
    """CE / KD / NORM / NORM+KD / DCM for the weak student and a twice-wider one."""
    teacher = ref.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x, y = split.x_train[:1000], split.y_train[:1000]
    rows = [
        f"Students of 3 conv-BN-ReLU blocks; 1,000 training images, {epochs} epochs of batch "
        "64, Adam 1e-2; teacher mnist-cnn (frozen backbone).",
        "",
        "| student loss | weak (4, 8, 16) | target (≥ KD) | wider (8, 16, 32) | target (≥ KD) |",
        "|---|---|---|---|---|",
    ]
    res = {w: {a: [] for a in KD_ARMS} for w in (WEAK, WIDER)}
    for widths in (WEAK, WIDER):
        for seed in seeds:
            for arm in KD_ARMS:
                student = _fit_weak(arm, teacher, x, y, epochs, seed, widths)
                res[widths][arm].append(_top1(student, split.x_test, split.y_test))
                print(f"{widths} {arm} seed {seed}: {res[widths][arm][-1]:.2f}", file=sys.stderr)
    for arm, name in KD_ARMS.items():
        cells = []
        for widths in (WEAK, WIDER):
            vals, kd = res[widths][arm], statistics.mean(res[widths]["kd"])
            met = _met(statistics.mean(vals) >= kd) if arm not in ("ce", "kd") else ""
            cells += [_cell(vals), met]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


# ---- the section -------------------------------------------------------------------------


def run(quick: bool = False) -> str:
    """The bench section: Markdown tables; ``quick``: one seed and fewer steps."""
    from compactnn.measure.environment import environment

    torch.set_num_threads(THREADS)
    seeds = [0] if quick else [0, 1, 2]
    ref = load_reference("mnist-cnn", progress=False)
    split = load_mnist()
    costs: dict[str, dict] = {}
    env = environment(THREADS, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))
    out = ["## Data-free compression", "", "; ".join(f"{k}: {v}" for k, v in env.items()), ""]
    out += [f"Seeds: {seeds}{' (quick)' if quick else ''}.", ""]
    out += ["### DAFL: a student with no real data", ""]
    out += [*dafl_rows(ref, split, seeds, 300 if quick else 3000, costs), ""]
    out += ["### Data-free calibration", "", *calib_rows(seeds, quick, costs), ""]
    out += ["### Positive-unlabeled compression", ""]
    out += [*pu_rows(ref, split, seeds, 300 if quick else 1000), ""]
    out += ["### NORM and DCM for weak students", ""]
    out += [*kd_rows(ref, split, seeds, 8 if quick else 30), ""]
    out += [
        "### Generation cost (first seed)",
        "",
        "| what | seconds | peak RSS MiB |",
        "|---|---|---|",
    ]
    out += [f"| {k} | {c['seconds']:.1f} | {c['peak_rss_mib']:.0f} |" for k, c in costs.items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
