"""Trained artifacts cached on disk, so that the demo does not retrain a recipe every run.

A training recipe takes minutes, a post-training one seconds. :func:`cached_train` trains
once and keeps the frozen artifact in the cache directory of
:mod:`compactnn.models.cache` as ``<model>-<recipe>-<key>/``. The key hashes the float
model's weights, the recipe, the seed, the training data and the source files of the code
that trains and packs it (``quant``, ``train``, ``distill``, ``core``, ``export``): editing
any of them trains again instead of reusing a stale artifact (the artifact format version is
part of the key too, and a cached artifact that fails to load is trained again). The
directory is written under a temporary name and renamed, so an interrupted run never leaves
a partial artifact behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

import compactnn
from compactnn.core.digest import tensor_digest
from compactnn.errors import ArtifactError
from compactnn.export.artifact import FORMAT_VERSION
from compactnn.models.cache import cache_dir, cache_key
from compactnn.recipe import resolve_recipe

_SOURCE_PACKAGES = ("quant", "train", "distill", "core", "export")


def _sources() -> list[bytes]:
    root = Path(compactnn.__file__).parent
    files = sorted(p for pkg in _SOURCE_PACKAGES for p in (root / pkg).rglob("*.py"))
    return [str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() for p in files]


def training_key(name: str, model: nn.Module, recipe: str, data: Any, seed: int) -> str:
    """The cache key of ``model`` trained with ``recipe`` on ``data`` at ``seed``."""
    state = model.state_dict()
    arrays = [data.x_train, data.y_train] if hasattr(data, "x_train") else list(data)
    return cache_key(
        f"{name}-{recipe}",
        _sources(),
        recipe=resolve_recipe(recipe).to_yaml(),
        seed=seed,
        format_version=FORMAT_VERSION,
        weights=tensor_digest(state[k] for k in sorted(state)),
        data=tensor_digest(arrays),
    )


def cached_train(
    ref: Any, recipe: str, data: Any, *, seed: int = 0, progress: bool = False
) -> tuple[nn.Module, float, bool]:
    """``compactnn.train(ref.model, recipe, data)``, read from the cache when it is there.

    Args:
        ref: a :class:`~compactnn.models.reference.Reference` (its ``model``, ``name`` and
            ``skeleton``).
        recipe: a training recipe name (``"w2a8-ttq"``, ``"w1a1-reactnet"``, ...).
        data: the labelled training split (``x_train``/``y_train``) or ``(inputs, labels)``.
        seed: the training seed (part of the key).
        progress: progress bars while training.

    Returns:
        ``(model, train_seconds, from_cache)``: the model as loaded back from its artifact
        (bit-exact with the trained one), the wall time of the training run that made it
        (measured then, stored in the artifact), and whether it came from the cache.

    Example:
        >>> ref = load_reference("mnist-cnn")                                  # doctest: +SKIP
        >>> q, seconds, hit = cached_train(ref, "w2a8-ttq", load_mnist())      # doctest: +SKIP
    """
    key = training_key(ref.name, ref.model, recipe, data, seed)
    path = cache_dir() / f"{ref.name}-{recipe}-{key}"
    hit = (path / "compactnn.json").exists()
    if hit:
        try:
            model = compactnn.load(path, model=ref.skeleton())
        except ArtifactError:  # damaged or of an older format: train again
            shutil.rmtree(path, ignore_errors=True)
            hit = False
    if not hit:
        t0 = time.perf_counter()
        trained = compactnn.train(ref.model, recipe, data, seed=seed, progress=progress)
        trained._compactnn["extra"]["training"]["seconds"] = round(time.perf_counter() - t0, 1)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            compactnn.save(trained, tmp / "a", force=True)
            try:
                (tmp / "a").rename(path)
            except OSError:  # another process cached it meanwhile: keep theirs
                if not (path / "compactnn.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        model = compactnn.load(path, model=ref.skeleton())
    seconds = float(compactnn.info_of(model)["extra"]["training"]["seconds"])
    return model, seconds, hit
