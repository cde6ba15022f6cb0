"""Reference models for the demo, the benchmarks and the tests.

``load_reference(name)`` returns a :class:`Reference`: a trained float model, calibration
batches from its training data, and its quality measure on held-out data. ``REFERENCES``
maps each name to its builder; add a reference with one line at the end of this file.
"""

from __future__ import annotations

from collections.abc import Callable

from compactnn._submodules import submodule
from compactnn.errors import CompactnnError
from compactnn.models.digits_resnet import build_digits_resnet
from compactnn.models.mnist_cnn import build_mnist_cnn
from compactnn.models.reference import Reference


def _build_minilm(**kwargs) -> Reference:
    # imported on use: transformers takes seconds to import
    from compactnn.models.minilm import build_minilm

    return build_minilm(**kwargs)


def _build_tiny_lm(**kwargs) -> Reference:
    from compactnn.models.tiny_lm import build_tiny_lm

    return build_tiny_lm(**kwargs)


REFERENCES: dict[str, Callable[..., Reference]] = {
    "mnist-cnn": build_mnist_cnn,
    "digits-resnet": build_digits_resnet,
    "minilm": _build_minilm,
    "tiny-lm": _build_tiny_lm,
}


def load_reference(name: str, *, progress: bool = True) -> Reference:
    """The reference model called ``name`` (trained and cached on first use if needed).

    Example:
        >>> ref = load_reference("mnist-cnn", progress=False)  # doctest: +SKIP
        >>> ref.metric  # doctest: +SKIP
        'top1'
    """
    builder = REFERENCES.get(name)
    if builder is None:
        raise CompactnnError(
            f"unknown reference model {name!r}: choose one of {', '.join(sorted(REFERENCES))}."
        )
    return builder(progress=progress)


__all__ = ["REFERENCES", "Reference", "load_reference"]


def __getattr__(name: str) -> object:
    """``compactnn.models.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
