"""Trained reference weights cached on disk, keyed by the code and settings that made them.

The cache directory is ``$COMPACTNN_CACHE``, else ``$XDG_CACHE_HOME/compactnn``, else
``~/.cache/compactnn``. A file is ``<name>-<key>.safetensors`` where ``key`` hashes the
source files of the model, its training loop and its data split, plus the seed and epochs:
editing any of them, or changing the seed, trains a new model instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from compactnn.errors import CompactnnError, cut, first_line, user_stacklevel
from compactnn.export.fs import atomic_write

CACHE_FIX = "set COMPACTNN_CACHE (or XDG_CACHE_HOME) to a writable folder"


def cache_dir() -> Path:
    """The user's compactnn cache directory (created when missing).

    Raises:
        CompactnnError: it cannot be created (a part of its path is a file, a folder that
            refuses new folders, no home directory), naming the variable it came from.
    """
    root, source = os.environ.get("COMPACTNN_CACHE"), "COMPACTNN_CACHE"
    if not root:
        xdg, source = os.environ.get("XDG_CACHE_HOME"), "XDG_CACHE_HOME"
        if not xdg:
            source = "HOME"
            try:
                xdg = os.path.join(Path.home(), ".cache")
            except RuntimeError as exc:  # no HOME and no password-database entry
                raise CompactnnError(
                    f"no home directory to hold the compactnn cache: {CACHE_FIX}."
                ) from exc
        root = os.path.join(xdg, "compactnn")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # NotADirectoryError, FileExistsError, FileNotFoundError (/proc)...
        why = "a part of its path is a file" if _blocked_by_file(path) else exc.strerror
        raise CompactnnError(
            f"cannot create the compactnn cache folder {cut(path)!r} (from ${source}): "
            f"{why or first_line(exc)}; {CACHE_FIX}."
        ) from exc
    return path


def _blocked_by_file(path: Path) -> bool:
    """Whether ``path`` or one of its parents exists and is not a folder."""
    return any(p.exists() and not p.is_dir() for p in (path, *path.parents))


def cache_key(name: str, sources: Iterable[str | bytes], **settings: object) -> str:
    """A 16-hex-digit key over a name, source texts and settings (seed, epochs, split...)."""
    h = hashlib.sha256(name.encode())
    for text in sources:
        data = text.encode() if isinstance(text, str) else text
        h.update(len(data).to_bytes(8, "little") + data)
    for k in sorted(settings):
        h.update(f"\0{k}={settings[k]!r}".encode())
    return h.hexdigest()[:16]


def module_sources(*modules: ModuleType) -> list[bytes]:
    """The bytes of each module's source file (what the cache key hashes)."""
    return [Path(m.__file__).read_bytes() for m in modules]


def _read(path: Path, key: str, model: nn.Module) -> bool:
    """Load ``path`` into ``model``; False when missing, stale or unreadable."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return False
            state = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError, KeyError) as exc:
        warnings.warn(
            f"ignoring unreadable cached weights {str(path)!r} ({exc}); retraining",
            stacklevel=user_stacklevel(),
        )
        return False
    return True


def load_or_train(
    name: str, key: str, model: nn.Module, train: Callable[[nn.Module], dict[str, str]]
) -> tuple[nn.Module, Path]:
    """Fill ``model`` from the cache, or call ``train(model)`` and cache the result.

    ``train`` returns string metadata stored beside the weights. The write is atomic, so a
    crash or a concurrent process never leaves a partial file behind.
    """
    path = cache_dir() / f"{name}-{key}.safetensors"
    if _read(path, key, model):
        return model, path
    meta = dict(train(model))
    meta.update(key=key, name=name)
    # contiguous clones: safetensors refuses shared or strided storage
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return model, path


def cached_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata stored with cached weights (name, key, seed, float score...)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold bit-identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
