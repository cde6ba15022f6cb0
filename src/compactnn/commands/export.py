"""``compactnn export ARTIFACT --format gguf|compressed-tensors|onnx --out PATH`` and ``--list``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.commands._common import add_model_args, human_bytes
from compactnn.errors import CompactnnError
from compactnn.export import formats
from compactnn.export.artifact import artifact_exists, read_header
from compactnn.export.fs import names_folder
from compactnn.model_io import reference_names, skeleton_for

_EPILOG = "formats:\n" + "\n".join(f"  {f.name:<20}{f.summary}" for f in formats.FORMATS)
_EPILOG += "\n\n`compactnn export ARTIFACT --list` says which formats ARTIFACT goes to exactly."


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="hand a compressed artifact to another runtime (GGUF, compressed-tensors, ONNX)",
        description="Export the compressed model in ARTIFACT to a runtime's format, verified "
        "against compactnn's simulation.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("artifact", metavar="ARTIFACT", help="a compactnn artifact directory")
    p.add_argument("--format", "-f", choices=formats.NAMES, help="the target format")
    p.add_argument("--out", "-o", help="output file (gguf) or directory")
    p.add_argument(
        "--list", action="store_true", help="list which formats ARTIFACT can go to exactly"
    )
    p.add_argument(
        "--requantize",
        action="store_true",
        help="requantize weights that have no exact type in the format (the error is "
        "reported) instead of refusing",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer.json (or a directory holding one) to embed in a gguf file; a tiny-lm "
        "artifact uses its own",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--model", help="the float model the artifact was made from, when it is not recorded"
    )
    add_model_args(p)
    return p


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any]:
    """The compressed model, the artifact's source record, and an example input or None."""
    if not artifact_exists(args.artifact):
        raise CompactnnError(
            f"{args.artifact!r} is not a compactnn artifact; make one with "
            "`compactnn compress MODEL --recipe R --out DIR`."
        )
    header = read_header(args.artifact)
    source = header.get("extra", {}).get("source", {})
    source = source if isinstance(source, dict) else {}
    if args.model or source.get("model") in reference_names():
        loaded = skeleton_for(
            header, args.model, weights=args.weights, trust_pickle=args.trust_pickle
        )
        return compactnn.load(args.artifact, model=loaded.model), source, loaded.example
    if not header.get("extra", {}).get("hf"):  # the user's own model: only they can build it
        raise CompactnnError(
            f"{args.artifact!r} was compressed from your own model: pass it as for "
            "`compactnn eval`, with --model MODULE:FUNCTION --weights FILE (or --model FILE)."
        )
    return compactnn.load(args.artifact), source, None  # a Hugging Face skeleton


def _tokenizer(args: argparse.Namespace, source: dict[str, Any]) -> Any:
    if args.tokenizer:
        from compactnn._optional import require

        tokenizers = require("tokenizers", "hf")
        path = Path(args.tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise CompactnnError(f"--tokenizer {args.tokenizer!r}: no tokenizer.json there.")
        return tokenizers.Tokenizer.from_file(str(path))
    if source.get("model") == "tiny-lm":
        from compactnn.models.tiny_lm import load_tokenizer

        return load_tokenizer()
    return None


def _example(qmodel: Any, example: Any) -> dict[str, torch.Tensor]:
    """The reference's example batch, or 16 seeded token ids for a Hugging Face model."""
    if isinstance(example, dict):
        return example
    vocab = getattr(getattr(qmodel, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise CompactnnError(
            "--format onnx needs an example input and this artifact's model has no "
            "vocabulary to draw token ids from; export it from Python with example=."
        )
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _cnn_onnx(artifact: str) -> str:
    """Where a model that is not a Hugging Face transformer gets its ONNX file."""
    return (
        f"this is not a Hugging Face transformer; for other models `compactnn deploy {artifact} "
        "--model ... --onnx FILE` writes a verified int8 (QDQ) ONNX file"
    )


def list_formats(qmodel: Any, artifact: str = "ARTIFACT") -> list[str]:
    """One line per format: ``exact`` or the reason it is not."""
    lines = []
    for name, reason in formats.capabilities(qmodel).items():
        if name == "onnx" and reason is not None and not _is_hf(qmodel):
            reason = _cnn_onnx(artifact)
        lines.append(f"  {name:<20}{'exact' if reason is None else 'no: ' + reason}")
    return lines


def _is_hf(qmodel: Any) -> bool:
    return hasattr(getattr(qmodel, "config", None), "model_type")


def run(args: argparse.Namespace) -> int:
    if not args.list and not (args.format and args.out):
        raise CompactnnError("export needs --format F and --out PATH, or --list.")
    if args.format == "gguf" and args.out and (names_folder(args.out) or Path(args.out).is_dir()):
        raise CompactnnError(
            f"--out {args.out!r} names a folder, but gguf writes one file: give a file path "
            f"such as {str(Path(args.out) / 'model.gguf')!r}."
        )
    if args.out and Path(args.out).exists() and not args.force and not args.list:
        raise CompactnnError(f"--out {args.out!r} exists; pass --force to replace it.")
    qmodel, source, example = _load(args)
    if args.list:
        print(f"{args.artifact} can go to:")
        print("\n".join(list_formats(qmodel, args.artifact)))
        return 0
    if args.format == "onnx" and not _is_hf(qmodel):
        raise CompactnnError(f"--format onnx: {_cnn_onnx(args.artifact)}.")
    opts: dict[str, Any] = {"requantize": args.requantize}
    tokenizer = _tokenizer(args, source)
    if args.format == "gguf":
        opts["tokenizer"] = tokenizer
    elif args.format == "compressed-tensors" and hasattr(tokenizer, "save_pretrained"):
        opts["tokenizer"] = tokenizer  # a transformers tokenizer saves its files beside
    elif args.format == "onnx":
        opts["example"] = _example(qmodel, example)
    out = formats.export(args.format, qmodel, args.out, **opts)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0
    size = size or out.stat().st_size
    print(f"exported {args.artifact} as {args.format}: {out}  {human_bytes(size)}")
    print("  verified against compactnn's simulation (see docs/export.md)")
    return 0
