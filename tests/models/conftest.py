import pytest

from compactnn.models.fit import FitConfig

# a tiny training budget: enough to exercise train -> cache -> load, in about a second
TINY = FitConfig(epochs=1, limit=256)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    """A session-wide cache directory, so the tiny models train once per test session."""
    root = tmp_path_factory.mktemp("compactnn-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPACTNN_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_mnist_cnn(cache_root):
    from compactnn.models.mnist_cnn import build_mnist_cnn

    return build_mnist_cnn(progress=False, fit=TINY)
