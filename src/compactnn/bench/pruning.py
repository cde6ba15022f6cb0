"""Pruning benchmarks: accuracy after pruning and fine-tuning, bytes on disk, MACs, latency.

Run: ``python -m compactnn.bench --only pruning`` (``quick=True`` shortens fine-tuning).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings

import torch
from torch import nn

import compactnn
from compactnn._optional import require
from compactnn.measure.timing import time_model
from compactnn.prune.dns import DNSConfig, DNSPruner
from compactnn.prune.gradual import GradualConfig, GradualPruner
from compactnn.prune.masks import sparsity_of
from compactnn.prune.stats import count_macs, count_params
from compactnn.prune.train import finetune
from compactnn.recipe import Recipe

THREADS = 2
CMD = "python -m compactnn.bench --only pruning"


def _loader(split, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(split.x_train.shape[0], generator=g)
    return [(split.x_train[i], split.y_train[i]) for i in torch.split(idx, batch)]


def _bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        compactnn.save(model, os.path.join(d, "a"))
        return os.path.getsize(os.path.join(d, "a", "model.safetensors"))


def _w4(first_last: int | None) -> Recipe:
    fl = "null" if first_last is None else first_last
    return Recipe.from_yaml(
        "name: w4\nsteps:\n  - method: rtn\n"
        f"    config: {{weight: {{bits: 4, symmetric: false}}, first_last_bits: {fl}}}\n"
    )


def _nz(model: nn.Module) -> str:
    nnz, total = sparsity_of(model)
    return f"{1 - nnz / total:.1%} ({total / max(nnz, 1):.1f}x fewer non-zeros)"


def _train_pruned(model, pruner_cls, cfg, split, epochs, names):
    pruner = pruner_cls(model, cfg, names)
    finetune(
        model, [b for _ in range(epochs) for b in _loader(split, seed=_)], 1, 1e-3, None, pruner
    )
    return model


def cnn_unstructured(quick: bool) -> str:
    """mnist-cnn at 90% sparsity: one-shot, gradual + FT, DNS + FT; sizes with int4."""
    from compactnn.data.mnist import load_mnist
    from compactnn.models import load_reference

    ref, split = load_reference("mnist-cnn", progress=False), load_mnist()
    epochs = 2 if quick else 6
    steps = epochs * len(_loader(split))
    names = [n for n, m in ref.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names = names[1:]  # the first conv (144 weights) stays dense, the usual convention
    rows, models = [], {}
    t0 = time.perf_counter()
    models["sp90 one-shot (no FT)"] = compactnn.compress(ref.model, "sp90", progress=False)
    gcfg = GradualConfig(final_sparsity=0.9, end_step=int(0.6 * steps), frequency=10)
    models["gradual 90% + FT"] = _train_pruned(
        copy.deepcopy(ref.model), GradualPruner, gcfg, split, epochs, names
    )
    dcfg = DNSConfig(sparsity=0.9, surgery_steps=int(0.6 * steps), frequency=10)
    models["DNS 90% + FT"] = _train_pruned(
        copy.deepcopy(ref.model), DNSPruner, dcfg, split, epochs, names
    )
    base = ref.evaluate(ref.model)
    fbytes = _bytes(ref.model)
    rows.append(f"| float | {base:.2f} | - | 0.0% | {fbytes:,} | 1.0x |")
    for label, m in models.items():
        acc = ref.evaluate(m)
        b = _bytes(m)
        rows.append(
            f"| {label} | {acc:.2f} | {acc - base:+.2f} | {_nz(m)} | {b:,} | {fbytes / b:.1f}x |"
        )
    best = max(("gradual 90% + FT", "DNS 90% + FT"), key=lambda k: ref.evaluate(models[k]))
    for fl in (8, None):
        q = compactnn.compress(models[best], _w4(fl), progress=False)
        acc, b = ref.evaluate(q), _bytes(q)
        tag = "first/last 8-bit" if fl else "all layers 4-bit"
        rows.append(
            f"| {best} + int4 ({tag}) | {acc:.2f} | {acc - base:+.2f} | {_nz(q)} | "
            f"{b:,} | {fbytes / b:.1f}x |"
        )
    head = (
        "| mnist-cnn | top-1 % | vs float | sparsity | safetensors bytes | smaller |\n"
        "|---|---|---|---|---|---|"
    )
    return (
        f"### Unstructured 90% on mnist-cnn ({epochs} fine-tuning epochs on the 4,000 "
        f"training digits; top-1 on the 1,000 held-out; {time.perf_counter() - t0:.0f} s)\n\n"
        + head
        + "\n"
        + "\n".join(rows)
        + "\n"
    )


def lenet_dns(quick: bool) -> str:
    """DNS on LeNet-5: non-zero reduction and accuracy, uniform and per-layer sparsity.

    Adam at 1e-3, cosine-decayed to 0 over all epochs; masks are revised every 5 steps for
    the first 60% of the steps, then frozen while the learning rate decays.
    """
    from compactnn.data.mnist import load_mnist
    from compactnn.models.lenet import build_lenet5
    from compactnn.prune.masks import bake_masks

    ref, split = build_lenet5(progress=False), load_mnist()
    epochs = 2 if quick else 6
    steps = epochs * len(_loader(split))
    base = ref.evaluate(ref.model)
    rows = [f"| float | {base:.2f} | - | {count_params(ref.model):,} | 1.0x | - |"]
    settings = {  # label -> per-layer sparsity (conv1, conv2, fc1, fc2)
        "uniform 92%": (0.92, 0.92, 0.92, 0.92),
        "per layer 50/85/95/75%": (0.5, 0.85, 0.95, 0.75),
        "per layer 50/90/97/80%": (0.5, 0.9, 0.97, 0.8),
    }
    for label, rates in settings.items():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        m = copy.deepcopy(ref.model)
        per_layer = dict(zip(("conv1", "conv2", "fc1", "fc2"), rates, strict=True))
        cfg = DNSConfig(layer_sparsity=per_layer, surgery_steps=int(0.6 * steps), frequency=5)
        pruner = DNSPruner(m, cfg)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        m.train()
        for e in range(epochs):
            for x, y in _loader(split, seed=e):
                loss = nn.functional.cross_entropy(m(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                pruner.step()
        m.eval()
        bake_masks(m)
        nnz, total = sparsity_of(m)
        acc = ref.evaluate(m)
        rows.append(
            f"| DNS {label} | {acc:.2f} | {acc - base:+.2f} | {nnz:,} of {total:,} weights "
            f"| {total / nnz:.1f}x | {time.perf_counter() - t0:.0f} |"
        )
    head = (
        "| LeNet-5 | top-1 % | vs float | non-zero weights | fewer non-zeros | train s |\n"
        "|---|---|---|---|---|---|"
    )
    return (
        f"### DNS on LeNet-5 ({epochs} epochs: surgery for 60% of the steps, then fine-tuning "
        "with frozen masks; Adam 1e-3 cosine-decayed; per layer: conv1/conv2/fc1/fc2)\n\n"
        f"{head}\n" + "\n".join(rows) + "\n"
    )


def resnet_channels(quick: bool) -> str:
    """ResNet-18 (random weights) with 50% of channels removed: params, MACs, latency."""
    torchvision = require("torchvision", "bench")

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    side = 160 if quick else 224
    x1, x8 = torch.randn(1, 3, side, side), torch.randn(8, 3, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = compactnn.compress(model, "ch50", calib_data=x1, progress=False)
    rows = []
    base = {}
    for label, m in (("float", model), ("ch50 (L1)", pruned)):
        p, macs = count_params(m), count_macs(m, x1)
        t1 = time_model(m, x1, threads=THREADS, runs=10)
        t8 = time_model(m, x8, threads=THREADS, runs=5 if quick else 10)
        base = base or {"p": p, "macs": macs, "t1": t1.median_s, "t8": t8.median_s}
        rows.append(
            f"| {label} | {p / 1e6:.2f} M ({base['p'] / p:.2f}x) | {macs / 1e9:.2f} G "
            f"({base['macs'] / macs:.2f}x) | {t1.median_s * 1e3:.1f} ms "
            f"({base['t1'] / t1.median_s:.2f}x) | {t8.median_s * 1e3:.0f} ms "
            f"({base['t8'] / t8.median_s:.2f}x) |"
        )
    head = (
        "| ResNet-18 | parameters | MACs (batch 1) | latency batch 1 | latency batch 8 |\n"
        "|---|---|---|---|---|"
    )
    return (
        f"### ResNet-18, 50% of channels removed ({side}x{side}, fp32 eager, "
        f"{THREADS} threads, median of 10 runs after warm-up)\n\n{head}\n" + "\n".join(rows) + "\n"
    )


def cnn_channels(quick: bool) -> str:
    """mnist-cnn with 30% of channels removed, before and after fine-tuning."""
    from compactnn.data.mnist import load_mnist
    from compactnn.models import load_reference

    ref, split = load_reference("mnist-cnn", progress=False), load_mnist()
    epochs = 1 if quick else 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = compactnn.compress(ref.model, "ch30", calib_data=ref.calib, progress=False)
    base, one_shot = ref.evaluate(ref.model), ref.evaluate(pruned)
    ft = copy.deepcopy(pruned)
    opt = torch.optim.Adam(ft.parameters(), lr=1e-3)
    ft.train()
    for e in range(epochs):
        for x, y in _loader(split, seed=e):
            loss = nn.functional.cross_entropy(ft(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    ft.eval()
    acc = ref.evaluate(ft)
    x = ref.example
    rows = [
        f"| float | {base:.2f} | - | {count_params(ref.model):,} | {count_macs(ref.model, x):,} |",
        f"| ch30 one-shot | {one_shot:.2f} | {one_shot - base:+.2f} | {count_params(pruned):,} | "
        f"{count_macs(pruned, x):,} |",
        f"| ch30 + {epochs} epochs FT | {acc:.2f} | {acc - base:+.2f} | {count_params(ft):,} | "
        f"{count_macs(ft, x):,} |",
    ]
    head = (
        "| mnist-cnn | top-1 % | vs float | parameters | MACs (64 images) |\n|---|---|---|---|---|"
    )
    return "### 30% of channels removed from mnist-cnn\n\n" + head + "\n" + "\n".join(rows) + "\n"


def oneshot_transformers(quick: bool) -> str:
    """MiniLM at 50% (and 2:4): magnitude vs Wanda vs SparseGPT, embedding fidelity."""
    from compactnn.models import REFERENCES, load_reference

    ref = load_reference("minilm", progress=False)
    # sequential layer-by-layer calibration costs one (truncated) forward per layer and
    # batch; 2 batches (32 sentences) keep this section to minutes on 2 shared cores
    calib = ref.calib[:2]
    rows = [f"| float | {ref.evaluate(ref.model):.4f} | - |"]
    for recipe in (
        "sp50",
        "sp50-wanda",
        "sp50-sparsegpt",
        "nm2:4",
        "nm2:4-wanda",
        "nm2:4-sparsegpt",
    ):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = compactnn.compress(ref.model, recipe, calib_data=calib, progress=False)
        seconds = time.perf_counter() - t0
        rows.append(f"| {recipe} | {ref.evaluate(m):.4f} | {seconds:.1f} s |")
    note = (
        ""
        if "tiny-lm" in REFERENCES
        else (
            "\nThe small causal LM (`tiny-lm`) is not available in this checkout yet: its "
            "perplexity comparison is not measured.\n"
        )
    )
    head = "| MiniLM (all Linear layers) | mean cosine vs float | compress time |\n|---|---|---|"
    n = sum(int(b["input_ids"].shape[0]) for b in calib)
    return (
        f"### One-shot pruning of MiniLM ({n} calibration sentences)\n\n{head}\n"
        + "\n".join(rows)
        + "\n"
        + note
    )


def run(quick: bool = False) -> str:
    """All pruning measurements as Markdown."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    parts = [f"## Pruning\n\n`{CMD}` (torch threads: {THREADS})\n"]
    for fn in (cnn_unstructured, lenet_dns, resnet_channels, cnn_channels, oneshot_transformers):
        try:
            parts.append(fn(quick))
        except Exception as exc:  # a failed measurement is reported, not hidden
            parts.append(f"### {fn.__name__}: FAILED\n\n`{type(exc).__name__}: {exc}`\n")
    return "\n".join(parts)
