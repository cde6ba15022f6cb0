"""``compactnn export ARTIFACT --format gguf|compressed-tensors|onnx --out PATH`` and ``--list``."""

from __future__ import annotations

import argparse
import inspect
import os
import textwrap
import warnings
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.commands._common import add_model_args, check_apart_from_inputs, human_bytes
from compactnn.commands.export_sources import (
    TOKENIZER_FORMATS,
    check_source_named,
    gguf_folder_tokenizer,
    read_tokenizer,
    source_files,
)
from compactnn.deployment.ship import KEY as DEPLOYMENT_KEY
from compactnn.deployment.ship import is_deployed_artifact
from compactnn.errors import CompactnnError, name_list
from compactnn.export import formats
from compactnn.export.artifact import artifact_exists, read_header
from compactnn.export.artifact import load as load_artifact
from compactnn.export.ct_folder import NO_TOKENIZER, FolderFiles
from compactnn.export.fs import names_folder
from compactnn.export.hf_check import probe_inputs
from compactnn.export.onnx_hf_verify import read_line
from compactnn.model_io import reference_names, skeleton_for


def _wrapped(text: str, first: str = "", rest: str = "") -> str:
    """``text`` in lines of 78 columns at most, as argparse wraps for an 80-column terminal
    (the description and format list below are laid out as written, not re-wrapped)."""
    return textwrap.fill(
        text, 78, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    )


_DESCRIPTION = _wrapped(
    "Export the compressed model in ARTIFACT to a runtime's format, verified against "
    "compactnn's simulation."
)
_EPILOG = "formats:\n" + "\n".join(
    _wrapped(f.summary, f"  {f.name:<20}", " " * 22) for f in formats.FORMATS
)
_EPILOG += "\n\n" + _wrapped(
    "`compactnn export ARTIFACT --list` says which formats ARTIFACT goes to exactly."
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="hand a compressed artifact to another runtime (GGUF, compressed-tensors, ONNX)",
        description=_DESCRIPTION,
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
        help="tokenizer.json (or a directory holding one) for gguf (embedded in the file) and "
        "compressed-tensors (saved in the folder); default: the --model folder's, a "
        "reference model's own",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--model",
        help="the float model the artifact was made from, when it is not a reference model; "
        "its folder's tokenizer files go into gguf and compressed-tensors exports",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="hide progress bars (Hugging Face's too)"
    )
    add_model_args(p)
    return p


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """The artifact's record of its float model (data, never a path to read); refuses a
    missing ARTIFACT or one that is not an artifact."""
    if not os.path.lexists(args.artifact):
        raise CompactnnError(
            f"{args.artifact!r} does not exist; give the folder `compactnn compress ... --out "
            "DIR` wrote."
        )
    if not artifact_exists(args.artifact):
        raise CompactnnError(
            f"{args.artifact!r} is not a compactnn artifact; make one with "
            "`compactnn compress MODEL --recipe R --out DIR`."
        )
    source = read_header(args.artifact).get("extra", {}).get("source", {})
    return source if isinstance(source, dict) else {}


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any]:
    """The compressed model, the artifact's source record, and an example input or None."""
    source = _source(args)
    header = read_header(args.artifact)
    # a deployed artifact (deploy --save) holds the compressed model it was deployed from:
    # that model is what goes to a format, without re-deploying it
    load = load_artifact if is_deployed_artifact(args.artifact) else compactnn.load
    if args.model or source.get("model") in reference_names():
        loaded = skeleton_for(
            header, args.model, weights=args.weights, trust_pickle=args.trust_pickle
        )
        return load(args.artifact, model=loaded.model), source, loaded.example
    if not header.get("extra", {}).get("hf"):  # the user's own model: only they can build it
        raise CompactnnError(
            f"{args.artifact!r} was compressed from your own model: pass it as for "
            "`compactnn eval`, with --model MODULE:FUNCTION --weights FILE (or --model FILE)."
        )
    return load(args.artifact), source, None  # a Hugging Face skeleton


def _tokenizer(args: argparse.Namespace, source: dict[str, Any], given: Any) -> Any:
    if given is not None:
        return given
    if source.get("model") == "tiny-lm":
        from compactnn.models.tiny_lm import load_tokenizer

        return load_tokenizer()
    return None


def takes_segments(model: Any) -> bool:
    """Whether ``model`` reads segment ids: its ``forward`` takes ``token_type_ids`` and its
    config has more than one segment (``type_vocab_size > 1``, BERT's 2 for sentence pairs)."""
    types = getattr(getattr(model, "config", None), "type_vocab_size", None)
    if not isinstance(types, int) or types < 2:
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "token_type_ids" in params


def _example(qmodel: Any, example: Any) -> dict[str, torch.Tensor]:
    """The keyword batch the ONNX graph is traced (and verified) on, holding every input the
    model takes: the reference's example batch, 16 seeded token ids for a Hugging Face
    model, or 2 seeded images of its config's size for an image model (ViT); with
    ``token_type_ids`` when the model reads segment ids (:func:`takes_segments`), a sentence
    pair's (0 for the first 8 tokens, 1 after) where no example gives them
    (a given example without them gets zeros, the model's own default)."""
    if isinstance(example, dict):
        batch = dict(example)
    elif getattr(qmodel, "main_input_name", None) == "pixel_values":  # ViT: an image batch
        batch = probe_inputs(qmodel)  # of the config's size (or a one-line refusal)
    else:
        vocab = getattr(getattr(qmodel, "config", None), "vocab_size", None)
        if not isinstance(vocab, int):
            raise CompactnnError(
                "--format onnx needs an example input and this artifact's model has no "
                "vocabulary to draw token ids from; export it from Python with example=."
            )
        ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if takes_segments(qmodel):
            batch["token_type_ids"] = (torch.arange(16) >= 8).long().unsqueeze(0)  # (1, 16)
    ids = batch.get("input_ids")
    if "token_type_ids" not in batch and isinstance(ids, torch.Tensor) and takes_segments(qmodel):
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def _cnn_onnx(
    artifact: str, deployed: bool = False, qmodel: Any = None, reference: bool = False
) -> str:
    """Where a model that is not a Hugging Face transformer gets its ONNX file: ``deploy``
    (``--model`` only for the user's own model, not a reference one), which needs a model
    that quantizes its activations."""
    model = "" if reference else " --model ..."
    if deployed:  # `deploy` takes the compressed artifact, not the deployed one
        return (
            f"this is not a Hugging Face transformer; `compactnn deploy COMPRESSED_ARTIFACT"
            f"{model} --onnx FILE`, run on the compressed artifact (compactnn compress "
            f"--out) that {artifact} was deployed from, writes a verified int8 (QDQ) ONNX file"
        )
    line = (
        f"this is not a Hugging Face transformer; for other models `compactnn deploy {artifact}"
        f"{model} --onnx FILE` writes a verified int8 (QDQ) ONNX file"
    )
    if qmodel is None or _quantizes_activations(qmodel):
        return line
    recipe = getattr(getattr(qmodel, "_compactnn", {}).get("recipe"), "name", None)
    return (
        f"{line} when the model quantizes its activations, and {artifact} quantizes weights "
        f"only{f' (recipe {recipe})' if recipe else ''}: compress with a recipe such as w8a8 "
        "first"
    )


def _quantizes_activations(qmodel: Any) -> bool:
    return any(getattr(m, "input_quantizer", None) is not None for m in qmodel.modules())


def _deployed_note(artifact: str) -> str:
    """What a deployed artifact (``deploy --save``) is and how it runs."""
    record = read_header(artifact).get("extra", {}).get(DEPLOYMENT_KEY, {})
    backend = record.get("backend") if isinstance(record, dict) else None
    note = (
        f"{artifact} is a deployed artifact (compactnn deploy --save, backend {backend}): in "
        f"Python, compactnn.load({artifact!r}, model=...) re-deploys and re-verifies it"
    )
    if backend == "onnxruntime":
        note += ", and its .export_onnx(FILE) writes the ONNX file it runs"
    return note + ". It also holds the compressed model it was deployed from, which can go to:"


def list_formats(
    qmodel: Any,
    artifact: str = "ARTIFACT",
    deployed: bool = False,
    example: Any = None,
    reference: bool = False,
) -> list[str]:
    """One line per format: ``exact`` or the reason it is not; what this command can write
    (an ONNX export needs an input it can build: :func:`_example`)."""
    lines = []
    for name, reason in formats.capabilities(qmodel).items():
        if name == "onnx" and reason is not None and not _is_hf(qmodel):
            reason = _cnn_onnx(artifact, deployed, qmodel, reference)
        elif name == "onnx" and reason is None:
            try:
                _example(qmodel, example)
            except CompactnnError as exc:
                reason = str(exc)
        if reason is None:
            note = formats.caveat(name, qmodel)
            lines.append(f"  {name:<20}exact" + (f" (but {note})" if note else ""))
        else:
            lines.append(f"  {name:<20}no: {reason}")
    return lines


def _is_hf(qmodel: Any) -> bool:
    return hasattr(getattr(qmodel, "config", None), "model_type")


def check_out_apart(args: argparse.Namespace) -> None:
    """Refuse, ``--force`` or not, an ``--out`` that is an input of the command (ARTIFACT,
    ``--model``, ``--weights``, the ``--tokenizer`` file), lies inside an input folder, or
    holds an input; so is the file a format writes in an ``--out`` folder (``model.onnx``)."""
    tokenizer = args.tokenizer
    if tokenizer and Path(tokenizer).is_dir():  # only its tokenizer.json is read
        tokenizer = str(Path(tokenizer) / "tokenizer.json")
    inputs = {"ARTIFACT": args.artifact, "--model": args.model}
    inputs |= {"--weights": args.weights, "--tokenizer": tokenizer}
    suggest = {"gguf": "model.gguf", "onnx": "onnx-out/"}.get(args.format, "ct-out/")
    check_apart_from_inputs(args.out, "--out", inputs, suggest)
    written = formats.out_path(args.format, args.out)
    check_apart_from_inputs(written, "--out", inputs, suggest)


def _verification(path: Path) -> str | None:
    """The measured line the ONNX export stored in the file (None for a file without it)."""
    try:
        return read_line(path)
    except Exception:  # a file another tool wrote: nothing to add
        return None


def run(args: argparse.Namespace) -> int:
    if not args.list and not (args.format and args.out):
        raise CompactnnError("export needs --format F and --out PATH, or --list.")
    given_tokenizer = None
    if not args.list:
        if args.format == "gguf" and (names_folder(args.out) or Path(args.out).is_dir()):
            raise CompactnnError(
                f"--out {args.out!r} names a folder, but gguf writes one file: give a file "
                f"path such as {str(Path(args.out) / 'model.gguf')!r}."
            )
        check_out_apart(args)
        formats.check_out(args.format, args.out, force=args.force, what="--out")
        if args.tokenizer:
            given_tokenizer = read_tokenizer(args)
    files = None  # tokenizer files: only from a folder the user names, or a reference's own
    if not args.list and given_tokenizer is None and args.format in TOKENIZER_FORMATS:
        check_source_named(args, (recorded := _source(args)))
        files = source_files(args, recorded)
    deployed = is_deployed_artifact(args.artifact)
    qmodel, source, example = _load(args)
    reference = source.get("model") in reference_names() and not args.model
    if args.list:
        print(_deployed_note(args.artifact) if deployed else f"{args.artifact} can go to:")
        lines = list_formats(qmodel, args.artifact, deployed, example, reference)
        print("\n".join(lines))
        return 0
    if args.format == "onnx" and not _is_hf(qmodel):
        onnx = _cnn_onnx(args.artifact, deployed, qmodel, reference)
        raise CompactnnError(f"--format onnx: {onnx}.")
    opts: dict[str, Any] = {"requantize": args.requantize}
    tokenizer = _tokenizer(args, source, given_tokenizer)
    gguf_note = None
    if args.format == "gguf" and tokenizer is None:  # the float model folder's, if it has one
        tokenizer, gguf_note = gguf_folder_tokenizer(files, getattr(qmodel, "config", None))
    if args.format == "gguf":
        opts["tokenizer"] = tokenizer
    elif args.format == "compressed-tensors" and (fast := _saveable(tokenizer)) is not None:
        opts["tokenizer"] = fast  # a transformers tokenizer saves its files beside
    elif args.format == "compressed-tensors" and files is not None:
        opts["tokenizer"] = files  # the --model folder's tokenizer / processor, copied
    elif args.format == "onnx":
        opts["example"] = _example(qmodel, example)
    beside = _files_beside(args.format, args.out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = formats.export(args.format, qmodel, args.out, force=args.force, **opts)
    for w in caught:  # shown as they came, before the summary they qualify
        if not str(w.message).startswith(NO_TOKENIZER):  # said below, in the CLI's words
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0
    size = size or out.stat().st_size
    print(f"exported {args.artifact} as {args.format}: {out}  {human_bytes(size)}")
    print(f"  {verified_line(caught)} (see docs/export.md)")
    if args.format == "onnx" and out.is_file() and (line := _verification(out)) is not None:
        print(f"  {line}")  # what the read-back measured: example and probe batch
    if (note := formats.run_note(args.format, qmodel)) is not None:
        print(f"  {note}")
    if gguf_note is not None:
        print(f"  {gguf_note}")
    elif tokenizer is not None and args.format != "onnx" and "tokenizer" in opts:
        whose = f"--tokenizer {args.tokenizer}" if given_tokenizer else source.get("model")
        where = "in the file" if args.format == "gguf" else "in the folder: pipeline() reads it"
        print(f"  with the tokenizer of {whose} ({where})")
    if beside:
        print(f"  written into the existing folder {out.parent}, beside {name_list(beside, 3)}")
    if isinstance(opts.get("tokenizer"), FolderFiles):
        files = opts["tokenizer"]
        print(f"  with {', '.join(files.names)} from {files.folder} (pipeline() reads them)")
    elif args.format == "compressed-tensors" and "tokenizer" not in opts:
        print(f"  {CT_NO_TOKENIZER}")
    return 0


def _files_beside(fmt: str, out: str) -> list[str]:
    """The other entries of the existing folder an ONNX ``--out FOLDER`` writes
    ``model.onnx`` into (the output names them, not to be mistaken for the export's)."""
    written = formats.out_path(fmt, out)
    if fmt != "onnx" or written == Path(out) or not written.parent.is_dir():
        return []
    return sorted(p.name for p in written.parent.iterdir() if p.name != written.name)


CT_NO_TOKENIZER = (
    "no tokenizer written (none found beside the source model): pass --tokenizer DIR (a folder "
    "holding tokenizer.json) to add one"
)


def _saveable(tokenizer: Any) -> Any:
    """``tokenizer`` as one whose ``save_pretrained`` writes its files: a transformers one as
    it is, tiny-lm's (a ``tokenizers`` BPE with its specials) wrapped; else None."""
    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return None
    from compactnn._optional import require
    from compactnn.models.tiny_lm import SPECIALS

    fast = require("transformers", "hf").PreTrainedTokenizerFast
    pad, bos, eos = SPECIALS
    return fast(tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos)


def verified_line(caught: list) -> str:
    """What the export's read-back checked: the whole file against the simulation, or the
    exact tensors bit-identical and the requantized ones within the error a warning gave.

    Example:
        >>> verified_line([])
        "verified against compactnn's simulation"
    """
    if any("requantized" in str(w.message) for w in caught):
        return (
            "verified: exact tensors bit-identical to compactnn's, requantized ones within the "
            "error the warning gives"
        )
    return "verified against compactnn's simulation"
