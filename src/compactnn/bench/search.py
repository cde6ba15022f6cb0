"""Benchmark: mixed-precision search (issue 15) against uniform recipes at the same size.

* CNNs (``mnist-cnn``, ``digits-resnet``): formats w2a8/w3a8/w4a8/w8a8, byte budget = the
  cost model's bytes of uniform ``w3a8`` (first and last layers at 8 bits, as the short name
  does); top-1 on the held-out test split; target: the searched drop is at most half of
  uniform w3a8's.
* ``digits-resnet`` over 8 training seeds (2 with ``quick``): the 364-image test split
  resolves one image (0.27 points), so drops are averaged over independently trained models.
* ResNet-18 (torchvision, random weights, BN statistics of its inputs) under 0.8 x uniform
  w8a8's deployed latency, 2 threads, with channel-pruned formats (``ch25+w8a8``,
  ``ch50+w8a8``) and residual groups (a whole stream's channels pruned together) as the
  candidates that run faster on the int8 runtime; measured end to end (wall and CPU time),
  proxy error, output cosine against the float model.
* Accuracy-aware ``digits-resnet``, 0.5-point budget: the training images are memorised
  (float top-1 about 100%), so ``eval_fn`` scores the even-indexed test images and every row
  is reported on the odd-indexed ones, which the search never sees; the result is compared
  with the smallest uniform recipe that meets the budget there; the number of full
  evaluations is reported.
* MiniLM (``quick=False`` only): weight-only GPTQ, formats w2/w3/w4/w8 with groups of 32, byte
  budget = uniform ``w3-g32-gptq``; the reversed allocation (most sensitive layers get the
  fewest bits, same multiset of formats) as a sanity check; mean cosine on held-out sentences.

Run: ``OMP_WAIT_POLICY=PASSIVE python -m compactnn.bench.search``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

import compactnn
from compactnn.core.calib import as_batches
from compactnn.export.fs import atomic_write
from compactnn.export.size import theoretical_size
from compactnn.mixed_precision import Budget, build_recipe, search
from compactnn.mixed_precision.allocate import assignment_total
from compactnn.mixed_precision.api import uniform_choice
from compactnn.mixed_precision.cost import biased_layers, cost_tables
from compactnn.mixed_precision.formats import parse_formats
from compactnn.mixed_precision.layers import searched_layers, searched_model

CNN_FORMATS = ["w2a8", "w3a8", "w4a8", "w8a8"]
LM_FORMATS = ["w2-g32-gptq", "w3-g32-gptq", "w4-g32-gptq", "w8-g32-gptq"]
COMMAND = "python -m compactnn.bench.search"
LATENCY_FORMATS = "ch25+w8a8,ch50+w8a8,ch75+w8a8,w8a8"


def uniform_bytes(model, formats: list[str], calib, fmt: str, first_last: str) -> float:
    """The cost model's bytes of the uniform recipe ``fmt`` with first/last at ``first_last``."""
    layers = searched_layers(searched_model(model, parse_formats(formats)), as_batches(calib))
    biased = biased_layers(model, list(layers))  # as the search prices them (folded BN bias)
    table = cost_tables(layers, parse_formats(formats), biased=biased)["bytes"]
    return assignment_total(table, uniform_choice(formats, fmt, len(layers), first_last))


def _compress(model, recipe, calib):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compactnn.compress(model, recipe, calib_data=calib, progress=False)


def cnn_rows(name: str) -> list[str]:
    """Searched vs uniform w3a8 at the uniform's byte budget."""
    from compactnn.models import load_reference

    ref = load_reference(name, progress=False)
    base = ref.evaluate(ref.model)
    budget = uniform_bytes(ref.model, CNN_FORMATS, ref.calib, "w3a8", "w8a8")
    t0 = time.perf_counter()
    r = search(
        ref.model,
        formats=CNN_FORMATS,
        budget=Budget(max_bytes=budget),
        calib_data=ref.calib,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    rows = []
    u = _compress(ref.model, "w3a8", ref.calib)
    q = _compress(ref.model, r.recipe, ref.calib)
    qu, qm = ref.evaluate(u), ref.evaluate(q)
    target = "met" if base - qm <= (base - qu) / 2 else "not met"
    rows.append(f"| {name} | uniform w3a8 | {theoretical_size(u)} | {qu:.2f} | {base - qu:.2f} | |")
    mix = ", ".join(r.assignment.values())
    rows.append(
        f"| {name} | searched ({mix}; {seconds:.1f} s) | {theoretical_size(q)} | {qm:.2f} | "
        f"{base - qm:.2f} | {target} |"
    )
    return rows


def _digits_preds(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).argmax(1)


def digits_seed_rows(seeds: tuple[int, ...] = tuple(range(8))) -> list[str]:
    """digits-resnet trained from several seeds: searched vs uniform w3a8 at equal size.

    One test split of 364 images resolves 0.27 points (one image), less than the drops being
    compared, so the comparison is repeated on independently trained models (each seed's own
    calibration images, the first 512 training digits) and the drops are averaged over all
    seeds' test predictions (364 x seeds). Two budgets: the bytes of the ``w3a8`` short name
    (first and last layers at 8 bits) and an average of 3 weight bits against ``w3a8`` on
    every layer. ``flips``: test images whose prediction differs from the float model's.
    """
    from compactnn.data.digits import load_digits8
    from compactnn.models.digits_resnet import build_digits_resnet

    split = load_digits8()
    x, y = split.x_test, split.y_test
    totals: dict[str, list[float]] = {}
    rows = []
    for seed in seeds:
        ref = build_digits_resnet(progress=False, seed=seed)
        p0 = _digits_preds(ref.model, x)
        base = float((p0 == y).float().mean()) * 100
        fmts = parse_formats(CNN_FORMATS)
        layers = list(searched_layers(searched_model(ref.model, fmts), as_batches(ref.calib)))
        all3 = build_recipe(
            "w3a8-all", layers, fmts, uniform_choice(CNN_FORMATS, "w3a8", len(layers))
        )
        short_bytes = uniform_bytes(ref.model, CNN_FORMATS, ref.calib, "w3a8", "w8a8")
        cells = [str(seed), f"{base:.2f}"]
        for label, uniform, budget in (
            ("short", "w3a8", Budget(max_bytes=short_bytes)),
            ("avg3", all3, Budget(avg_bits=3)),
        ):
            r = search(
                ref.model, formats=CNN_FORMATS, budget=budget, calib_data=ref.calib, progress=False
            )
            for tag, recipe in (("uniform", uniform), ("searched", r.recipe)):
                q = _compress(ref.model, recipe, ref.calib)
                p = _digits_preds(q, x)
                drop = base - float((p == y).float().mean()) * 100
                flips = int((p != p0).sum())
                totals.setdefault(f"{label}-{tag}", []).append(drop)
                totals.setdefault(f"{label}-{tag}-flips", []).append(flips)
                totals.setdefault(f"{label}-{tag}-bytes", []).append(theoretical_size(q))
                cells.append(f"{theoretical_size(q)} B, {drop:.2f}, {flips}")
        rows.append("| " + " | ".join(cells) + " |")
    mean = {k: float(np.mean(v)) for k, v in totals.items()}
    cells = ["mean", ""]
    for label in ("short", "avg3"):
        for tag in ("uniform", "searched"):
            k = f"{label}-{tag}"
            cells.append(f"{mean[k + '-bytes']:.0f} B, {mean[k]:.2f}, {mean[k + '-flips']:.1f}")
    rows.append("| " + " | ".join(cells) + " |")
    for label in ("short", "avg3"):
        u, m = mean[f"{label}-uniform"], mean[f"{label}-searched"]
        verdict = "met" if m <= u / 2 else "not met"
        rows.append(
            f"| target ({label}) | | mean drop {m:.2f} vs half of uniform's {u / 2:.2f}: "
            f"**{verdict}** | | | |"
        )
    return rows


def resnet18_latency_rows(
    size: int = 64, batch: int = 8, formats: str = LATENCY_FORMATS, ratio: float = 0.8
) -> list[str]:
    """ResNet-18 (random weights, BN statistics of its inputs) under a latency budget of
    ``ratio`` x uniform w8a8's deployed latency, 2 threads; per-layer ``ch<P>+`` formats and
    residual groups (whole streams pruned together) as the candidates that run faster.
    Quality: output cosine against the float model on held-out random inputs (no trained
    weights, so no accuracy). Met when the searched recipe's deployed time is at most
    ``ratio`` x w8a8's in wall and in CPU time, timed side by side (rotating blocks)."""
    from compactnn.bench.deploy import _vision_model
    from compactnn.measure.fidelity import output_fidelity
    from compactnn.measure.timing import load_average

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the per-layer table times at the session's thread count
    try:
        model = _vision_model("resnet18", size)
        gen = torch.Generator().manual_seed(1)
        calib = torch.randn(2 * batch, 3, size, size, generator=gen)
        held = torch.randn(2 * batch, 3, size, size, generator=torch.Generator().manual_seed(2))
        batches = [calib[:batch], calib[batch:]]
        t0, c0 = time.perf_counter(), time.process_time()
        r = search(
            model,
            formats=formats,
            budget=Budget(max_latency_ratio=ratio),
            calib_data=batches,
            latency_example=calib[:batch],
            sensitivity_batches=1,
            progress=False,
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        fid = {}
        for label, recipe in (("w8a8", "w8a8"), ("searched", r.recipe)):
            fid[label] = output_fidelity(
                model, _compress(model, recipe, batches), [held[:batch], held[batch:]]
            )
    finally:
        torch.set_num_threads(threads)
    tag = f"{size}x{size} b{batch}"
    ref = r.latency["per_format_ms"]["w8a8"]
    rows = [
        f"| {tag} | uniform {f} | {ms:.2f} | {ms / ref:.3f} | | |"
        for f, ms in r.latency["per_format_ms"].items()
    ]
    for i, check in enumerate(r.latency["checks"]):
        counts = {f: list(check["assignment"].values()).count(f) for f in r.formats}
        chosen = [f"ch{round(v * 100)}" if v else "keep" for v in check["groups"].values()]
        worst = max(check["measured_ratio"], check["cpu_ratio"])
        met = "met" if worst <= ratio else "not met"
        label = "searched" if i + 1 == len(r.latency["checks"]) else f"round {i + 1}"
        rows.append(
            f"| {tag} | {label} (layers: {', '.join(f'{n} x{f}' for f, n in counts.items() if n)}"
            f"; streams: {', '.join(chosen) or 'none'}) | "
            f"{check['measured_ms']:.2f} wall, {check['measured_cpu_ms']:.2f} CPU "
            f"(w8a8 {check['reference_ms']:.2f}, {check['reference_cpu_ms']:.2f}) | "
            f"{check['measured_ratio']:.3f} wall, {check['cpu_ratio']:.3f} CPU; "
            f"budget {ratio}: **{met}** | {check['proxy_ms']:.2f} ({check['proxy_error']:+.1%}); "
            f"ratio {check['proxy_ratio']:.3f} ({check['proxy_ratio_error']:+.1%} vs CPU) | "
            + (
                f"cosine {fid['searched']['cosine']:.4f} (w8a8 {fid['w8a8']['cosine']:.4f}) |"
                if label == "searched"
                else "|"
            )
        )
    rows.append(
        f"| {tag} | search time | {wall:.0f} s wall, {cpu:.0f} s CPU | "
        f"load average {load_average()} | | |"
    )
    return rows


def accuracy_rows(max_drop: float = 0.5, max_evals: int = 8) -> list[str]:
    """Accuracy-aware digits-resnet: searched vs the smallest passing uniform recipe."""
    from compactnn.data.digits import load_digits8
    from compactnn.models import load_reference
    from compactnn.models.fit import top1

    ref = load_reference("digits-resnet", progress=False)
    split = load_digits8()
    # the training images are memorised (float top-1 ~100%): the search validates on the even
    # test images and every row is reported on the odd ones, which the search never sees
    x_val, y_val = split.x_test[0::2], split.y_test[0::2]
    x_out, y_out = split.x_test[1::2], split.y_test[1::2]

    def val(m):
        return top1(m, x_val, y_val)

    def held_out(m):
        return top1(m, x_out, y_out)

    base = held_out(ref.model)
    t0 = time.perf_counter()
    r = search(
        ref.model,
        formats=CNN_FORMATS,
        calib_data=ref.calib,
        eval_fn=val,
        max_drop=max_drop,
        max_evals=max_evals,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    q = _compress(ref.model, r.recipe, ref.calib)
    qt = held_out(q)
    uniform = []
    for fmt in CNN_FORMATS:
        u = _compress(ref.model, fmt, ref.calib)
        uniform.append((fmt, theoretical_size(u), held_out(u)))
    passing = [u for u in uniform if base - u[2] <= max_drop]
    smallest = min(passing, key=lambda u: u[1]) if passing else None
    rows = [f"| uniform {f} | {b} | {a:.2f} | {base - a:.2f} | |" for f, b, a in uniform]
    smaller = smallest is not None and theoretical_size(q) < smallest[1]
    meets = base - qt <= max_drop
    rows.append(
        f"| searched ({len(r.tried)} full evaluations, {seconds:.1f} s) | {theoretical_size(q)} "
        f"| {qt:.2f} | {base - qt:.2f} | meets {max_drop}: {'yes' if meets else 'no'}; smaller "
        f"than {smallest[0] if smallest else '(none passes)'}: {'yes' if smaller else 'no'} |"
    )
    return rows


def minilm_rows(n_calib: int = 128) -> list[str]:
    """MiniLM weight-only GPTQ at the bytes of uniform w3-g32-gptq; reversed allocation."""
    from compactnn.models import load_reference

    ref = load_reference("minilm", progress=False)
    calib = ref.calib[: max(1, n_calib // 16)]
    budget = uniform_bytes(ref.model, LM_FORMATS, calib, "w3-g32-gptq", "w8-g32-gptq")
    t0 = time.perf_counter()
    r = search(
        ref.model,
        formats=LM_FORMATS,
        budget=Budget(max_bytes=budget),
        calib_data=calib,
        embeddings="w3-g32",
        progress=False,
    )
    seconds = time.perf_counter() - t0
    fmts = parse_formats(LM_FORMATS)
    chosen = np.array([LM_FORMATS.index(r.assignment[n]) for n in r.layers])
    # reversed: sort layers by sensitivity at 3 bits and hand the smallest formats to the top
    order = np.argsort(-r.scores[:, LM_FORMATS.index("w3-g32-gptq")])
    reversed_choice = np.empty_like(chosen)
    reversed_choice[order] = np.sort(chosen)
    rows = []
    for label, recipe in (
        ("uniform w3-g32-gptq", "w3-g32-gptq"),
        (f"searched ({seconds:.0f} s)", r.recipe),
        ("reversed", build_recipe("reversed", r.layers, fmts, reversed_choice, "w3-g32")),
    ):
        q = _compress(ref.model, recipe, calib)
        rows.append(f"| {label} | {theoretical_size(q)} | {ref.evaluate(q):.4f} |")
    return rows


def plot_frontier(points: list[dict], path: str) -> None:
    """Quality against bytes (and against measured latency where given): the searched
    frontier as a line, uniform recipes as labelled crosses. ``points``: dicts with ``kind``
    (``"searched"`` / ``"uniform"``), ``label``, ``bytes``, ``quality``, optional ``ms``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = all(p.get("ms") is not None for p in points)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(10 if timed else 5, 4), squeeze=False)
    for ax, key, xlabel in zip(
        axes[0], ("bytes", "ms"), ("bytes (theoretical)", "deployed latency (ms)"), strict=False
    ):
        searched = sorted((p for p in points if p["kind"] == "searched"), key=lambda p: p[key])
        ax.plot(
            [p[key] for p in searched],
            [p["quality"] for p in searched],
            "o-",
            label="searched frontier",
        )
        for p in points:
            if p["kind"] == "uniform":
                ax.plot(p[key], p["quality"], "kx")
                ax.annotate(p["label"], (p[key], p["quality"]), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("quality")
        ax.legend()
    fig.tight_layout()
    kind = Path(path).suffix.lstrip(".") or "png"  # the temporary file's name ends in .tmp
    try:  # a crash keeps the previous picture, never a half-written one
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=kind))
    finally:
        plt.close(fig)


def frontier_rows(name: str = "mnist-cnn", plot: str | None = None) -> list[str]:
    """Every point of the searched byte frontier compressed and scored, beside uniform."""
    from compactnn.models import load_reference

    ref = load_reference(name, progress=False)
    r = search(
        ref.model,
        formats=CNN_FORMATS,
        budget=Budget(avg_bits=8),
        calib_data=ref.calib,
        frontier_points=8,
        progress=False,
    )
    points = []
    for fp in r.frontier:
        fmts = parse_formats(CNN_FORMATS)
        choice = [CNN_FORMATS.index(fp["assignment"][n]) for n in r.layers]
        q = _compress(ref.model, build_recipe("f", r.layers, fmts, choice), ref.calib)
        points.append(
            {
                "kind": "searched",
                "label": "",
                "bytes": theoretical_size(q),
                "quality": ref.evaluate(q),
            }
        )
    for fmt in CNN_FORMATS:
        q = _compress(ref.model, fmt, ref.calib)
        points.append(
            {
                "kind": "uniform",
                "label": fmt,
                "bytes": theoretical_size(q),
                "quality": ref.evaluate(q),
            }
        )
    if plot is not None:
        plot_frontier(points, plot)
    return [f"| {p['kind']} {p['label']} | {p['bytes']} | {p['quality']:.2f} |" for p in points]


def run(quick: bool = False) -> str:
    """The section as Markdown (``quick``: the CNN parts only)."""
    torch.manual_seed(0)
    lines = [
        "## Mixed-precision search",
        "",
        f"`{COMMAND}`; seed 0; sensitivity on 4 calibration batches of the training split; "
        "top-1 on the held-out test split.",
        "",
        "| model | recipe | bytes (theoretical) | top-1 | drop | target: drop <= half of uniform |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("mnist-cnn", "digits-resnet"):
        lines += cnn_rows(name)
    lines += [
        "",
        "digits-resnet over training seeds (each cell: bytes, top-1 drop, test images whose "
        "prediction changed), at the bytes of the `w3a8` short name and at 3 average bits:",
        "",
        "| seed | float top-1 | uniform w3a8 | searched | uniform w3a8 (all layers) | "
        "searched (avg 3 bits) |",
        "|---|---|---|---|---|---|",
    ]
    lines += digits_seed_rows((0, 1) if quick else tuple(range(8)))
    lines += [
        "",
        f"ResNet-18 (random weights), latency budget 0.8 x uniform w8a8, deployed on oneDNN "
        f"int8, 2 threads, formats {LATENCY_FORMATS} plus residual groups (whole streams "
        "pruned together); met when wall and CPU time both are within the budget:",
        "",
        "| input | recipe | ms / call | ratio to w8a8 | per-layer proxy ms (error vs wall); "
        "proxy ratio (error vs CPU ratio) | quality |",
        "|---|---|---|---|---|---|",
    ]
    for size, batch in ((64, 8),) if quick else ((224, 1), (224, 8), (64, 8)):
        lines += resnet18_latency_rows(size, batch)
    lines += [
        "",
        "Accuracy-aware, digits-resnet, 0.5-point budget:",
        "",
        "| recipe | bytes | top-1 (odd test images) | drop | |",
        "|---|---|---|---|---|",
    ]
    lines += accuracy_rows()
    lines += [
        "",
        "Frontier, mnist-cnn (each point compressed and scored on the test split):",
        "",
        "| recipe | bytes | top-1 |",
        "|---|---|---|",
    ]
    lines += frontier_rows()
    if not quick:
        lines += [
            "",
            "MiniLM, weight-only, bytes of uniform w3-g32-gptq:",
            "",
            "| recipe | bytes | mean cosine |",
            "|---|---|---|",
        ]
        lines += minilm_rows()
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv))
