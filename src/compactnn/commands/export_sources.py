"""Where ``compactnn export`` takes tokenizer and processor files from: a folder or file the
user names (``--tokenizer``, ``--model``) or a compactnn reference model's own, never a path
an artifact records (an artifact never names files to read); read as plain files only, and
no tokenizer code is ever run."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from compactnn.errors import CompactnnError, cut, first_line
from compactnn.export.ct_folder import FolderFiles, check_plain, processor_files, read_plain
from compactnn.export.hf import _code_files

# the formats whose export takes a tokenizer (embedded in the file, saved in the folder)
TOKENIZER_FORMATS = ("gguf", "compressed-tensors")


def tokenizer_code_refusal(folder: Path, label: str) -> CompactnnError | None:
    """The error for a tokenizer folder whose ``tokenizer_config.json`` has an ``auto_map``
    (the folder ships its own tokenizer code, which compactnn never runs); else None. An
    unreadable or odd ``tokenizer_config.json`` is left to transformers' own error.

    Example:
        >>> tokenizer_code_refusal(Path("no-such-folder"), "--tokenizer x") is None
        True
    """
    path = folder / "tokenizer_config.json"
    if not check_plain(path):
        return None
    try:
        config = json.loads(read_plain(path))
    except ValueError:
        return None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if isinstance(auto_map, list):  # older configs: [slow class, fast class]
        auto_map = {"AutoTokenizer": auto_map}
    if not isinstance(auto_map, dict) or not auto_map:
        return None
    return CompactnnError(
        f"{label}: {str(path)!r} has an auto_map naming tokenizer code ({_code_files(auto_map)}"
        f"{', from another repository' if '--' in json.dumps(auto_map) else ''}), and "
        "compactnn never runs code a tokenizer folder names: "
        "give a folder whose tokenizer_config.json names a transformers tokenizer class "
        "(delete auto_map if its tokenizer_class is one), or its tokenizer.json alone."
    )


def read_tokenizer(args: argparse.Namespace) -> Any:
    """The tokenizer ``--tokenizer`` names, read before any slow work: a
    ``tokenizers.Tokenizer`` for gguf, a transformers tokenizer (whose ``save_pretrained``
    writes its files into the folder) for compressed-tensors. In a folder, the files
    transformers reads must be plain files, and a ``tokenizer_config.json`` naming code
    (``auto_map``) is refused; transformers loads it with ``trust_remote_code=False`` and
    local files only.

    Raises:
        CompactnnError: the format does not use a tokenizer, the path holds no tokenizer.json
            that the tokenizers library reads, a file there is a link or special file, or
            the folder ships tokenizer code.
    """
    if args.format not in TOKENIZER_FORMATS:
        raise CompactnnError(
            f"--tokenizer is used by --format gguf and compressed-tensors, not {args.format}: "
            "drop --tokenizer."
        )
    from compactnn._optional import require

    tokenizers = require("tokenizers", "hf")
    given = Path(args.tokenizer)
    label = f"--tokenizer {args.tokenizer!r}"
    folder = given.is_dir()
    if folder:  # what transformers reads there: plain files, and no code
        processor_files(given)
        check_plain(given / "config.json")
        if (refusal := tokenizer_code_refusal(given, label)) is not None:
            raise refusal
    path = given / "tokenizer.json" if folder else given
    if not path.is_file():
        raise CompactnnError(
            f"{label}: no tokenizer.json there; give a Hugging Face tokenizer.json or the "
            "folder holding one."
        )
    data = read_plain(path) if folder else path.read_bytes()  # a file named: the user's
    try:
        tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # the library's own error types: any means "not a tokenizer"
        raise CompactnnError(
            f"{label}: {str(path)!r} is not a tokenizer.json the tokenizers library reads "
            f"({first_line(exc)}); give a Hugging Face tokenizer.json or the folder holding one."
        ) from exc
    if args.format == "gguf":  # refused now, not after the slow work, in the CLI's words
        from compactnn.export.gguf_tokenizer import gpt2_vocab

        gpt2_vocab(
            tokenizer,
            fix=f"leave out --tokenizer {args.tokenizer!r} to write the "
            "model without a vocabulary (token ids only)",
        )
        return tokenizer
    transformers = require("transformers", "hf")
    try:
        if folder and (given / "tokenizer_config.json").is_file():
            return transformers.AutoTokenizer.from_pretrained(
                str(given), trust_remote_code=False, local_files_only=True
            )
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    except Exception as exc:
        raise CompactnnError(
            f"{label}: transformers cannot load it ({first_line(exc)}); give a folder that "
            "AutoTokenizer.from_pretrained reads."
        ) from exc


def check_source_named(args: argparse.Namespace, source: dict[str, Any]) -> None:
    """Refuse, before any slow work, a gguf or compressed-tensors export of an artifact made
    from a Hugging Face folder that still exists, when neither ``--model`` nor
    ``--tokenizer`` names where its tokenizer comes from: the artifact's record of that
    folder is data, never a path to read (as ``compactnn eval`` asks for ``--model``). A
    recorded folder that is gone reads nothing: the export goes on without tokenizer.

    Example:
        >>> ns = argparse.Namespace(format="onnx", model=None, tokenizer=None)
        >>> check_source_named(ns, {"kind": "Hugging Face directory", "model": "/x"})
    """
    if args.format not in TOKENIZER_FORMATS or args.model or args.tokenizer:
        return
    folder = source.get("model")
    if source.get("kind") != "Hugging Face directory" or not isinstance(folder, str):
        return
    if not os.path.isdir(folder):  # a look at the path, not a read of any file in it
        return
    verb = "embed" if args.format == "gguf" else "copy"
    raise CompactnnError(
        f"this artifact was made from the Hugging Face directory {cut(folder)!r}, and an "
        f"artifact never names files to read: pass --model {cut(folder)} to {verb} its "
        "tokenizer files (or --tokenizer DIR for another tokenizer)."
    )


def source_files(args: argparse.Namespace, source: dict[str, Any]) -> FolderFiles | None:
    """The tokenizer / processor files export may take without ``--tokenizer``: those of the
    folder ``--model`` names, or the packaged MiniLM folder for the ``minilm`` reference;
    never those of a folder the artifact records (:func:`check_source_named`).

    Raises:
        CompactnnError: one of those files is a link or a special file.
    """
    if args.model:
        return processor_files(args.model) if Path(args.model).is_dir() else None
    if source.get("kind") == "reference" and source.get("model") == "minilm":
        from compactnn.models.minilm import model_path

        try:
            return processor_files(model_path())
        except CompactnnError:  # its package is not installed: no folder to copy from
            return None
    return None


def gguf_folder_tokenizer(files: FolderFiles | None, config: Any) -> tuple[Any, str]:
    """The tokenizer.json among ``files`` (:func:`source_files`: the float model folder's),
    read as a plain file for a gguf file, and the line that says what the file holds: that
    tokenizer, or none (token ids only) and why.

    Example:
        >>> gguf_folder_tokenizer(None, None)
        (None, 'no tokenizer embedded (token ids only): pass --tokenizer DIR (a folder holding tokenizer.json)')
    """  # noqa: E501
    none = "no tokenizer embedded (token ids only): pass --tokenizer DIR"
    if files is None or "tokenizer.json" not in files.names:
        return None, none + " (a folder holding tokenizer.json)"
    path = files.folder / "tokenizer.json"
    data = read_plain(path)  # a link put there since the listing is refused, not followed
    try:
        from compactnn._optional import require
        from compactnn.export.gguf_tokenizer import gpt2_vocab

        tokenizer = require("tokenizers", "hf").Tokenizer.from_str(data.decode("utf-8"))
        tokens = len(gpt2_vocab(tokenizer)["tokens"])
    except CompactnnError as exc:  # not byte-level BPE, or the library is missing
        return None, f"{none} ({path} does not go into GGUF: {str(exc).split('. ')[0]})"
    except Exception as exc:  # the tokenizers library's own errors: not a tokenizer it reads
        return None, f"{none} ({path} is not a tokenizer.json it reads: {first_line(exc)})"
    rows = getattr(config, "vocab_size", None)
    if isinstance(rows, int) and tokens > rows:
        return None, f"{none} ({path} has {tokens} tokens, the model {rows} embedding rows)"
    return (
        tokenizer,
        f"with the tokenizer of {files.folder} ({tokens} tokens; --tokenizer DIR for another)",
    )
