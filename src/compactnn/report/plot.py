"""``pareto.png``: quality against size on disk, one labelled point per recipe, one panel
per model."""

from __future__ import annotations

import io
from typing import Any

from compactnn._optional import require

require("matplotlib", "demo").use("Agg")  # files only; no display on servers or in CI
plt = require("matplotlib.pyplot", "demo")
_ticker = require("matplotlib.ticker", "demo")
FuncFormatter, LogLocator, NullFormatter = (
    _ticker.FuncFormatter,
    _ticker.LogLocator,
    _ticker.NullFormatter,
)

METRIC_LABELS = {"top1": "top-1 accuracy (%)", "cosine": "mean cosine vs float"}


def pareto_png(results: dict[str, Any]) -> bytes:
    """PNG bytes of the quality-vs-size plot of ``results`` (the demo's results dict)."""
    models = list(dict.fromkeys(r["model"] for r in results["rows"]))
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5.5 * max(len(models), 1), 4.2))
    axes = [axes] if len(models) <= 1 else list(axes)
    for ax, model in zip(axes, models, strict=False):
        rows = [r for r in results["rows"] if r["model"] == model]
        kib = max(r["size_bytes"] for r in rows) < 2**20  # small models read better in KiB
        sizes = [r["size_bytes"] / (2**10 if kib else 2**20) for r in rows]
        quality = [r["quality"] for r in rows]
        ax.plot(sizes, quality, linestyle="none", marker="o", color="tab:blue")
        for r, x, y in zip(rows, sizes, quality, strict=True):
            is_float = r["recipe"] == "float"
            if is_float:
                ax.plot([x], [y], marker="*", markersize=14, color="tab:orange", linestyle="none")
            ax.annotate(r["recipe"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0, 7.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.12, y=0.12)
        ax.set_xlabel(f"artifact size on disk ({'KiB' if kib else 'MiB'}, log scale)")
        ax.set_ylabel(METRIC_LABELS.get(rows[0]["metric"], rows[0]["metric"]))
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("quality vs size (up and left is better)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
