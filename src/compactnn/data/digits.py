"""scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels).

Split (fixed): per class, the first 80% of the stored images (rounded down) are the training
split and the rest the test split: 1,433 train and 364 test images. Each split is then put in
a fixed pseudo-random order (numpy seed 0).
"""

from __future__ import annotations

import functools

import numpy as np

from compactnn._optional import require
from compactnn.data.split import Split, make_split, per_class_split

TRAIN_FRACTION = 0.8
DESCRIPTION = "sklearn digits 1,797: per class first 80% train / rest test, numpy seed 0 order"


@functools.cache
def load_digits8() -> Split:
    """The embedded 8x8 digits, ``(N, 1, 8, 8)``, normalised with the training mean and std.

    Example:
        >>> split = load_digits8()
        >>> tuple(split.x_train.shape[1:])
        (1, 8, 8)
    """
    bunch = require("sklearn.datasets", "demo").load_digits()
    labels = np.asarray(bunch.target)
    train_idx, test_idx = per_class_split(labels, TRAIN_FRACTION)
    return make_split(np.asarray(bunch.data) / 16.0, labels, train_idx, test_idx, side=8)
