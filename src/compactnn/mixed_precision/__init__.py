"""Mixed-precision search: per-layer formats under a size, BOPs or accuracy budget.

Example:
    >>> from compactnn.mixed_precision import Budget, search
    >>> result = search(model, formats="w2a8,w4a8,w8a8", budget=Budget(avg_bits=4),
    ...                 calib_data=images)  # doctest: +SKIP
"""

from compactnn._submodules import submodule
from compactnn.mixed_precision.allocate import allocate
from compactnn.mixed_precision.api import Budget, SearchResult, build_recipe, search

__all__ = ["Budget", "SearchResult", "allocate", "build_recipe", "search"]


def __getattr__(name: str) -> object:
    """``compactnn.mixed_precision.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
