import pytest
import torch

import compactnn
from compactnn.data import load_mnist
from compactnn.errors import CompactnnError
from compactnn.models import fit, load_reference
from compactnn.models.cache import state_equal
from compactnn.models.fit import FitConfig
from compactnn.models.image import seeded
from compactnn.models.mnist_cnn import MnistCNN, build_mnist_cnn

TINY = FitConfig(epochs=1, limit=256)  # the budget of the session fixture in conftest.py


def test_architecture_small_first_conv_and_head():
    model = MnistCNN()
    n = sum(p.numel() for p in model.parameters())
    assert 90_000 <= n <= 110_000
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    first = model.features[0][0].weight.numel()
    head = model.head.weight.numel()
    assert first + head < 0.01 * n  # 8-bit first/last layers cost little at w4


def test_reference_fields(tiny_mnist_cnn):
    ref = tiny_mnist_cnn
    split = load_mnist()
    assert ref.name == "mnist-cnn" and ref.metric == "top1" and ref.kind == "cnn"
    assert not ref.model.training
    assert [b.shape[0] for b in ref.calib] == [64] * 8
    assert torch.equal(torch.cat(ref.calib), split.x_train[:512])  # train split only
    assert ref.example.shape == (64, 1, 28, 28)
    skeleton = ref.skeleton()
    assert skeleton.state_dict().keys() == ref.model.state_dict().keys()
    assert not state_equal(skeleton, ref.model)


def test_evaluate_is_top1_on_the_test_split(tiny_mnist_cnn):
    ref = tiny_mnist_cnn
    split = load_mnist()
    with torch.no_grad():
        expected = (ref.model(split.x_test).argmax(1) == split.y_test).double().mean() * 100
    assert ref.evaluate(ref.model) == pytest.approx(float(expected), abs=1e-9)


def test_second_build_hits_the_cache_bit_identical(tiny_mnist_cnn, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(fit, "train_classifier", no_training)
    again = build_mnist_cnn(progress=False, fit=TINY)
    assert state_equal(again.model, tiny_mnist_cnn.model)


def test_training_is_deterministic_and_seeded(tiny_mnist_cnn, cache_root):
    files = sorted(p.name for p in cache_root.glob("mnist-cnn-*"))
    assert len(files) >= 1
    other_seed = build_mnist_cnn(progress=False, fit=TINY, seed=1)
    assert not state_equal(other_seed.model, tiny_mnist_cnn.model)
    assert len(list(cache_root.glob("mnist-cnn-*"))) == len(files) + 1  # new key, new file
    # the same seed, trained from scratch in the same process, gives the same weights
    model = seeded(MnistCNN, 0)
    rng_before = torch.random.get_rng_state()
    fit.train_classifier(model, load_mnist(), TINY, 0, "retrain", progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert state_equal(model, tiny_mnist_cnn.model)


def test_w4a8_artifact_is_over_6x_smaller(tiny_mnist_cnn, tmp_path):
    ref = tiny_mnist_cnn
    qmodel = compactnn.compress(ref.model, "w4a8", calib_data=ref.calib, progress=False)
    compactnn.save(ref.model, tmp_path / "float")
    compactnn.save(qmodel, tmp_path / "w4a8")

    def size(d):
        return sum(p.stat().st_size for p in d.iterdir())

    assert size(tmp_path / "float") >= 6 * size(tmp_path / "w4a8")
    assert 0 <= ref.evaluate(qmodel) <= 100


def test_unknown_reference_names_the_choices():
    with pytest.raises(CompactnnError, match="mnist-cnn"):
        load_reference("resnet-9000")
