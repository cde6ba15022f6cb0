"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from compactnn.model_io import LoadedModel, resolve_model


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--weights`` and ``--trust-pickle``: how a MODEL argument is loaded."""
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="weights (.safetensors) for a package.module:factory MODEL",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a pickled .pt/.pth model (unpickling runs arbitrary code)",
    )


def load_model(spec: str, args: argparse.Namespace) -> LoadedModel:
    return resolve_model(spec, weights=args.weights, trust_pickle=args.trust_pickle)


def source_record(loaded: LoadedModel) -> dict[str, str]:
    """What an artifact records about its float model, so ``eval`` can rebuild it."""
    spec = loaded.source
    if loaded.reference is None and Path(spec).exists():
        spec = str(Path(spec).resolve())
    record = {"model": spec}
    if loaded.weights:
        record["weights"] = str(Path(loaded.weights).resolve())
    return record


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
