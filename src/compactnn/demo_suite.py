"""The demo's suite as data: (reference model, recipe) pairs; "float" is the baseline.

Training recipes (``w2a8-ttq``, ``w1a1-reactnet``) are trained with ``compactnn.train`` on
the reference's training split the first time (a few minutes on 2 cores), then read from
the cache (:mod:`compactnn.models.trained`); the others are post-training ``compress`` calls.

A suite name found in :data:`RECIPES` is that recipe object; any other is a short name.
``ch50-ft`` is the channel-pruning row, the short name (``prune/channel.py``): half of every
prunable layer's channels removed (L1), then 1,000 steps of self-distillation from the float
model on the calibration batches at lr 3e-3. One-shot ``ch50`` leaves mnist-cnn at chance
(10% top-1); fine-tuned it keeps about 97.8% (docs/pruning.md). The pruned model is a plain,
smaller float model, delivered on the fastest of its own float paths, so its row shows a
measured speedup over the float model's.
"""

from compactnn.recipe import Recipe

RECIPES: dict[str, Recipe] = {}  # suite rows that no short name spells (none at present)

SUITE: list[tuple[str, str]] = [
    ("mnist-cnn", "float"),
    ("mnist-cnn", "w8a8"),
    ("mnist-cnn", "w4a8"),
    ("mnist-cnn", "w4a4"),
    ("mnist-cnn", "w2a4"),
    ("mnist-cnn", "w4a4-qdrop"),
    ("mnist-cnn", "w2a4-brecq"),
    ("mnist-cnn", "w2a8-ttq"),
    ("mnist-cnn", "w1a1-reactnet"),
    ("mnist-cnn", "ch50-ft"),
    ("minilm", "float"),
    ("minilm", "w8"),
    ("minilm", "w4-g32"),
    ("minilm", "w3-g32"),
]


def suite_recipe(name: str) -> str | Recipe:
    """The recipe a suite entry names: a :data:`RECIPES` object, else the short name.

    Example:
        >>> suite_recipe("w4a8")
        'w4a8'
    """
    return RECIPES.get(name, name)
