"""compactnn: make trained PyTorch networks smaller and faster while keeping their accuracy.

Example:
    >>> import compactnn
    >>> qmodel = compactnn.compress(model, "w4a8", calib_data=images)  # doctest: +SKIP
    >>> compactnn.save(qmodel, "out/")                                  # doctest: +SKIP
    >>> qmodel2 = compactnn.load("out/", model=model)                   # doctest: +SKIP
"""

from compactnn.api import compress, info_of, load, save
from compactnn.deploy import deploy
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.recipe import Recipe, Step, resolve_recipe
from compactnn.train import train  # noqa: F401  (re-export; the function shadows the subpackage)

__all__ = [
    "ArtifactError",
    "CompactnnError",
    "Recipe",
    "Step",
    "compress",
    "deploy",
    "info_of",
    "load",
    "resolve_recipe",
    "save",
]
__version__ = "0.1.0"
