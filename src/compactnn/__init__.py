"""compactnn: make trained PyTorch networks smaller and faster while keeping their accuracy.

Example:
    >>> import compactnn
    >>> qmodel = compactnn.compress(model, "w4a8", calib_data=images)  # doctest: +SKIP
    >>> compactnn.save(qmodel, "out/")                                  # doctest: +SKIP
    >>> qmodel2 = compactnn.load("out/", model=model)                   # doctest: +SKIP

The entry points share one vocabulary: the model comes first, then the recipe (``compress``,
``train``) or the backend (``deploy``); data and options are keyword arguments
(``calib_data=``, ``example=``, ``dtype=``). Optional dependencies come as extras
(``pip install 'compactnn[hf|onnx|demo|bench]'``); ``import compactnn`` needs none of them.
"""

from typing import TYPE_CHECKING

# Where each public name lives. They are imported on first use (PEP 562): ``import compactnn``
# loads no torch, so the ``compactnn`` command can set OpenMP's wait policy before torch loads
# libgomp (cli.py), and ``compactnn --version`` or ``recipes`` start faster.
_PUBLIC = {
    "ArtifactError": "compactnn.errors",
    "Budget": "compactnn.mixed_precision",
    "CompactnnError": "compactnn.errors",
    "KernelConfig": "compactnn.kernels.swap",
    "Recipe": "compactnn.recipe",
    "SearchResult": "compactnn.mixed_precision",
    "Step": "compactnn.recipe",
    "artifact_digest": "compactnn.export.artifact",
    "compress": "compactnn.api",
    "deploy": "compactnn.deployment",
    "evaluate": "compactnn.measure",  # labelled quality: top-1 or a metric
    "info_of": "compactnn.api",
    "load": "compactnn.deployment.ship",
    "load_deployed": "compactnn.deployment.ship",
    "resolve_recipe": "compactnn.recipe",
    "save": "compactnn.deployment.ship",
    "save_deployed": "compactnn.deployment.ship",
    "search": "compactnn.mixed_precision",  # the subpackage is `mixed_precision`
    "to_kernels": "compactnn.kernels.swap",
    "to_ort_nbits": "compactnn.kernels.ort_nbits",
    "train": "compactnn.training",  # the subpackage is `training`: nothing is shadowed
}

if TYPE_CHECKING:  # what type checkers and IDEs see
    from compactnn.api import compress, info_of
    from compactnn.deployment import deploy
    from compactnn.deployment.ship import load, load_deployed, save, save_deployed
    from compactnn.errors import ArtifactError, CompactnnError
    from compactnn.export.artifact import artifact_digest
    from compactnn.kernels.ort_nbits import to_ort_nbits
    from compactnn.kernels.swap import KernelConfig, to_kernels
    from compactnn.measure import evaluate
    from compactnn.mixed_precision import (
        Budget,
        SearchResult,
        search,
    )  # subpackage: mixed_precision
    from compactnn.recipe import Recipe, Step, resolve_recipe
    from compactnn.training import train

__all__ = [
    "ArtifactError",
    "Budget",
    "CompactnnError",
    "KernelConfig",
    "Recipe",
    "SearchResult",
    "Step",
    "artifact_digest",
    "compress",
    "deploy",
    "evaluate",
    "info_of",
    "load",
    "load_deployed",
    "resolve_recipe",
    "save",
    "save_deployed",
    "search",
    "to_kernels",
    "to_ort_nbits",
    "train",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """The public names (``compactnn.compress``, ...) and the subpackages (``compactnn.data``,
    ``compactnn.models``, ...), each imported on first use: ``import compactnn`` loads neither
    torch nor the optional libraries some subpackages need."""
    import importlib

    if name in _PUBLIC:
        importlib.import_module("compactnn.methods")  # the built-in methods, registered
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    from compactnn._submodules import submodule

    return submodule(__name__, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
