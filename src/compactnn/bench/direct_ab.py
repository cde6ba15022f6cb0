"""Benchmark section ``direct_ab``: deployed w8a8 CNNs with and without the plan runner's
direct kernels, same process, side by side.

Each model is compressed with ``w8a8``, deployed on the ``onednn`` backend at each batch,
and its runner is built twice: as ``deploy`` builds it (``new``: the direct kernels of
``deployment/direct.py``, ``depthwise.py`` and ``hardswish.py`` where they fit: the
one-input-channel first layer, small plain convolutions with or without a residual sum,
depthwise convolutions, a convolution with its Hardswish and quantization, linear layers)
and with those turned off (``old``: oneDNN for every convolution and linear layer; the
head's and the codes' kernels run in both).
Both are timed in rotating rounds of blocks (CPU ms per call, median) by
:func:`compactnn.bench.demo_rows.direct_kernels_ab`, which also checks that their outputs are
bit-identical.

Run: ``OMP_WAIT_POLICY=PASSIVE python -m compactnn.bench --only direct_ab [--quick]``.
"""

from __future__ import annotations

import os
import warnings

import torch

THREADS = 2
COMMAND = "python -m compactnn.bench --only direct_ab"
CASES = (
    ("mnist-cnn", (1, 16)),
    ("digits-resnet", (1, 16)),
    ("resnet18-64", (1, 8)),
    ("mobilenet_v3_small-64", (1, 8)),
)


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The w8a8 model and a batch of 16 inputs."""
    import compactnn

    if name.endswith("-64"):  # a torchvision network with random weights at 64x64
        from compactnn.bench.deploy import _vision_model

        torch.manual_seed(0)
        calib = torch.randn(16, 3, 64, 64)
        model = _vision_model(name.removesuffix("-64"), 64)
    else:
        from compactnn.measure.fidelity import first_rows
        from compactnn.models import load_reference

        ref = load_reference(name, progress=False)
        model, calib = ref.model, first_rows(ref.example, 16)
    return compactnn.compress(model, "w8a8", calib_data=calib, progress=False), calib


def measure(quick: bool = False) -> list[dict]:
    """One row per (model, batch): CPU ms with and without the direct kernels."""
    import compactnn
    from compactnn.bench.demo_rows import direct_kernels_ab

    torch.set_num_threads(THREADS)
    rows = []
    for name, batches in CASES:
        qmodel, calib = _model(name)
        for batch in batches:
            x = calib[:batch]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: the gap is printed below
                fast = compactnn.deploy(
                    qmodel, example=x, backend="onednn", time_float=False, tolerance=50
                )
            ab = direct_kernels_ab(fast, x, 3 if quick else 7)
            rows.append({"model": name, "batch": batch, **ab})
    return rows


def run(quick: bool = False) -> str:
    """The bench section's Markdown."""
    from compactnn.measure.environment import environment

    rows = measure(quick)
    env = environment(THREADS, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))
    lines = [
        "## Direct kernels against oneDNN for every convolution, deployed w8a8 CNNs",
        "",
        f"`{COMMAND}{' --quick' if quick else ''}`; "
        + "; ".join(f"{k}: {v}" for k, v in env.items())
        + f"; load average after timing {os.getloadavg()[0]:.1f}.",
        "",
        "Same deployed model (the default deploy: float32 residual sums), runner built with",
        "and without the direct kernels (first layer, small plain and depthwise convolutions,",
        "residual sums, a convolution with its Hardswish and quantization, linear layers), CPU",
        "ms per call (median of rotating rounds); the torchvision networks have random weights.",
        "",
        "| model | batch | oneDNN for every layer | with the direct kernels | ratio | identical |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['old']:.3f} | {r['new']:.3f} | "
            f"{r['old'] / r['new']:.2f}x | {'yes' if r['identical'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick=True))
