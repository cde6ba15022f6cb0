"""The folder a compressed-tensors export writes (:mod:`compactnn.export.ctensors`): which
folders it refuses, before any slow work, and how its files are written (each atomically)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from compactnn._optional import require
from compactnn.errors import CompactnnError, name_list
from compactnn.export.fs import (
    atomic_write,
    atomic_write_text,
    force_option,
    read_regular,
    writable_folder,
)

WEIGHTS_NAME = "model.safetensors"
_OWN_FILES = {WEIGHTS_NAME, "config.json", "generation_config.json"}  # and a tokenizer's:
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges",
                    "chat_template", "spiece", "sentencepiece", "preprocessor_config",
                    "processor_config")  # fmt: skip
# what pipeline() / AutoTokenizer / AutoProcessor read beside the model (data, never code)
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "processor_config.json")  # fmt: skip


# the most bytes one tokenizer / processor file may have (the largest vocabularies' are ~40 MB)
FILE_LIMIT = 1 << 28


class FolderFiles:
    """A model folder's tokenizer / processor files, taken as an export's ``tokenizer=``: its
    ``save_pretrained(out)`` copies them into ``out`` (each atomically, plain files only)."""

    def __init__(self, folder: str | os.PathLike, names: list[str]) -> None:
        self.folder, self.names = Path(folder), list(names)

    def save_pretrained(self, out: str | os.PathLike) -> None:
        for name in self.names:
            data = read_plain(self.folder / name)
            atomic_write(Path(out) / name, lambda tmp, d=data: Path(tmp).write_bytes(d))


NO_TOKENIZER = "compressed-tensors export: no tokenizer given, none written"


def check_plain(path: Path) -> bool:
    """Whether ``path`` exists (False when it does not); refuse it unless it is a regular file.

    Raises:
        CompactnnError: ``path`` is a symbolic link (its target could be any file of this
            machine), a FIFO, device or socket, or cannot be looked at.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CompactnnError(f"{str(path)!r} cannot be read ({exc.strerror}).") from exc
    if stat.S_ISLNK(mode):
        if cache_blob(path) is not None:  # a Hugging Face cache snapshot's own link
            return True
        raise CompactnnError(
            f"{path} is a symbolic link: tokenizer and processor files are read and copied "
            "only as plain files (a link could bring any file of this machine into the "
            "export); put a copy of the real file in its place."
        )
    if not stat.S_ISREG(mode):
        raise CompactnnError(
            f"{path} is not a regular file (a FIFO, device or socket): tokenizer and "
            "processor files are read only as plain files; put a copy of the real file there."
        )
    return True


def read_plain(path: Path) -> bytes:
    """The bytes of the tokenizer / processor file ``path``, read without following a link
    (``O_NOFOLLOW``, checked again on the open file), at most :data:`FILE_LIMIT` bytes.

    Raises:
        CompactnnError: not a regular file (:func:`check_plain`), missing, too large, or
            replaced while read.
    """
    if not check_plain(path):
        raise CompactnnError(f"{path} is gone; it was there when the export started.")
    return read_regular(cache_blob(path) or path, None, FILE_LIMIT)


def cache_blob(path: Path) -> Path | None:
    """The file a Hugging Face cache snapshot's link ``path`` points to, or None.

    The hub cache stores each file once, ``<repo>/blobs/<hash>``, and links it from every
    revision that has it, ``<repo>/snapshots/<revision>/<name> -> ../../blobs/<hash>``. A link
    of that shape whose target is a regular file in that same ``blobs`` folder is followed;
    any other link is not (it could bring any file of this machine into the export).
    """
    path = Path(path)
    if not path.is_symlink() or path.parent.parent.name != "snapshots":
        return None
    target = Path(os.path.realpath(path))
    blobs = Path(os.path.realpath(path.parent.parent.parent)) / "blobs"
    try:
        regular = stat.S_ISREG(os.lstat(target).st_mode)
    except OSError:
        return None
    return target if regular and target.parent == blobs else None


def processor_files(folder: str | os.PathLike | None) -> FolderFiles | None:
    """The :data:`PROCESSOR_FILES` in ``folder`` (the float model's Hugging Face folder), or
    None when it is gone or holds none.

    Raises:
        CompactnnError: one of them is a symbolic link or a special file (:func:`check_plain`).
    """
    if not folder or not Path(folder).is_dir():
        return None
    names = [n for n in PROCESSOR_FILES if check_plain(Path(folder) / n)]
    return FolderFiles(folder, names) if names else None


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Write ``tokenizer``'s files into ``folder``: :class:`FolderFiles` copy their plain
    files; any other tokenizer's ``save_pretrained`` writes into a temporary folder first,
    from which only regular files that are not code (``.py``) are moved over, so no module a
    custom tokenizer class ships and no link lands in an export."""
    if isinstance(tokenizer, FolderFiles):
        tokenizer.save_pretrained(folder)
        return
    with tempfile.TemporaryDirectory(prefix=".cnn-tokenizer-", dir=folder) as tmp:
        tokenizer.save_pretrained(tmp)
        for entry in sorted(os.scandir(tmp), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=False) and not entry.name.endswith(".py"):
                os.replace(entry.path, folder / entry.name)


def _is_ct_config(path: Path) -> bool:
    """Whether ``path`` is a ``config.json`` with a compressed-tensors quantization_config."""
    try:
        qconfig = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors"


def _is_own_file(name: str) -> bool:
    """Whether an export writes files called ``name`` (its weights, configs, tokenizer)."""
    return name in _OWN_FILES or name.startswith(_TOKENIZER_FILES)


def check_out(out: str | os.PathLike, *, force: bool = False, what: str = "out") -> Path:
    """Refuse, before any slow work, a folder that
    :func:`~compactnn.export.ctensors.export` may not write.

    Args:
        out: the export folder.
        force: replace an earlier compressed-tensors export there.
        what: how the user named ``out``, for the messages (``"out"``, ``"--out"``).

    Raises:
        CompactnnError: ``out`` is a file; it holds anything but an earlier export
            (``config.json`` with a compressed-tensors ``quantization_config``, the weights,
            a tokenizer), even with ``force``; it holds an earlier export and ``force`` is
            false; or its folder is not writable.
    """
    folder = Path(out)
    if os.path.lexists(folder) and not folder.is_dir():
        raise CompactnnError(
            f"{what} {str(out)!r} is a file, and compressed-tensors writes a folder: give a "
            f"new or empty folder such as {str(folder.with_name(folder.name + '-ct'))!r}."
        )
    if folder.is_dir() and (entries := sorted(os.listdir(folder))):
        foreign = [e for e in entries if not _is_own_file(e)]
        if foreign or not _is_ct_config(folder / "config.json"):
            raise CompactnnError(
                f"{what} {str(out)!r} holds files that are not a compressed-tensors export "
                f"({name_list(foreign or entries, 3)}): the export would replace or mix with "
                "them. Give a new or empty folder (force=True / --force only replaces an "
                "earlier compressed-tensors export)."
            )
        if not force:
            raise CompactnnError(
                f"{what} {str(out)!r} holds a compressed-tensors export; pass "
                f"{force_option(what)} to replace it."
            )
    writable_folder(folder.absolute().parent, f"{what} {str(out)!r}")
    return folder


def _check_other_model(folder: Path) -> None:
    """``save_pretrained`` writes into ``folder`` as transformers does, but never over or
    beside another model's config or weights."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise CompactnnError(f"save_pretrained: {str(folder)!r} is a file; give a folder.")
    if not folder.is_dir():
        return
    config = folder / "config.json"
    weights = [
        e for e in sorted(os.listdir(folder))
        if e != WEIGHTS_NAME and e.endswith((".safetensors", ".bin", ".index.json", ".pt"))
    ]  # fmt: skip
    if weights or (config.exists() and not _is_ct_config(config)):
        raise CompactnnError(
            f"save_pretrained: {str(folder)!r} holds another model "
            f"({name_list(weights or ['config.json'], 3)}): saving would replace or mix "
            "with it. Give a new or empty folder."
        )


def _write_folder(
    qmodel: nn.Module, state: dict, qconfig: dict, folder: Path, tokenizer: Any
) -> None:
    """Write the export's files into ``folder`` (each atomically, weights first)."""
    safetensors = require("safetensors.torch", "hf")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(
        folder / WEIGHTS_NAME, lambda tmp: safetensors.save_file(state, tmp, {"format": "pt"})
    )
    config = qmodel.config.to_dict()
    config["architectures"] = [type(qmodel).__name__]
    config["quantization_config"] = qconfig
    for k in ("auto_map", "_name_or_path"):
        config.pop(k, None)
    generation = getattr(qmodel, "generation_config", None)
    if generation is not None and getattr(qmodel, "can_generate", lambda: False)():
        atomic_write_text(folder / "generation_config.json", generation.to_json_string())
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
