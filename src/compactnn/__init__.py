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

from compactnn.api import compress, info_of
from compactnn.deployment import deploy
from compactnn.deployment.ship import load, load_deployed, save, save_deployed
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export.artifact import artifact_digest
from compactnn.kernels.ort_nbits import to_ort_nbits
from compactnn.kernels.swap import KernelConfig, to_kernels
from compactnn.measure import evaluate  # labelled quality: top-1 or a metric
from compactnn.mixed_precision import Budget, SearchResult, search  # subpackage: mixed_precision
from compactnn.recipe import Recipe, Step, resolve_recipe
from compactnn.training import train  # the subpackage is `training`: nothing is shadowed

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
    """``compactnn.data``, ``compactnn.models`` and the other subpackages after a plain
    ``import compactnn`` (imported on first use, so the optional libraries some of them need
    are not loaded by ``import compactnn``)."""
    import importlib
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
