import torch

from compactnn.data.digits import load_digits8


def test_shapes_split_sizes_and_classes():
    s = load_digits8()
    assert s.x_train.shape == (1433, 1, 8, 8) and s.x_test.shape == (364, 1, 8, 8)
    assert s.x_test.dtype == torch.float32 and s.y_test.dtype == torch.int64
    assert set(s.y_test.tolist()) == set(range(10))
    # 80% per class (rounded down) in train
    counts = torch.bincount(torch.cat([s.y_train, s.y_test]))
    assert torch.equal(torch.bincount(s.y_train), (counts * 0.8).long())


def test_normalisation_and_determinism():
    from sklearn.datasets import load_digits

    s = load_digits8()
    raw = load_digits().data / 16.0
    pixels = s.x_train.double() * s.std + s.mean
    assert abs(s.mean - float(pixels.mean())) < 1e-6
    assert abs(s.mean - raw.mean()) < 0.01  # train statistics, close to the whole set's
    load_digits8.cache_clear()
    again = load_digits8()
    assert torch.equal(again.x_train, s.x_train) and torch.equal(again.y_train, s.y_train)
