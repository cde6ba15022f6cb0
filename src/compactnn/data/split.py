"""The container every embedded image data set returns: a fixed train/test split."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A fixed train/test split of an image data set, normalised with train statistics.

    Attributes:
        x_train: float32 images, ``(N_train, 1, H, W)``, normalised as ``(x - mean) / std``.
        y_train: int64 labels, ``(N_train,)``.
        x_test: float32 images, ``(N_test, 1, H, W)``, normalised the same way.
        y_test: int64 labels, ``(N_test,)``.
        mean: the pixel mean of the training images (after scaling to [0, 1]).
        std: the pixel standard deviation of the training images (after scaling to [0, 1]).

    The tensors are shared between calls of the loader that returned them: do not modify
    them in place (``clone()`` first).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float


def per_class_split(labels: np.ndarray, n_train_per_class: int | float) -> tuple:
    """Indices ``(train, test)``: per class, the first samples (in stored order) go to train.

    ``n_train_per_class`` is a count, or a fraction of each class (rounded down). Both index
    arrays are then put in a fixed pseudo-random order (seed 0), so that any prefix of the
    training set (the calibration batches) holds every class.
    """
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = n_train_per_class
        k = int(len(idx) * k) if isinstance(k, float) else k
        train.append(idx[:k])
        test.append(idx[k:])
    rng = np.random.default_rng(0)
    train_idx = np.concatenate(train)
    test_idx = np.concatenate(test)
    return train_idx[rng.permutation(len(train_idx))], test_idx[rng.permutation(len(test_idx))]


def make_split(images: np.ndarray, labels: np.ndarray, train_idx, test_idx, side: int) -> Split:
    """Normalise ``images`` (``(N, side*side)``, already in [0, 1]) with train statistics."""
    x = images.astype(np.float64)
    mean = float(x[train_idx].mean())
    std = float(x[train_idx].std())

    def images_of(idx: np.ndarray) -> torch.Tensor:
        z = ((x[idx] - mean) / std).astype(np.float32)
        return torch.from_numpy(z.reshape(-1, 1, side, side))

    def labels_of(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(labels[idx].astype(np.int64))

    return Split(
        x_train=images_of(train_idx),
        y_train=labels_of(train_idx),
        x_test=images_of(test_idx),
        y_test=labels_of(test_idx),
        mean=mean,
        std=std,
    )
