"""Compression without the training data.

* :func:`generate` (``"bn-inversion"``, ``"dafl"``): synthetic inputs for ``compress``'s
  ``calib_data`` or for ``train``; :func:`artifact_record`: what an artifact records of them.
* :mod:`~compactnn.datafree.dafl`: DAFL student distillation (and its replay variant).
* :mod:`~compactnn.datafree.pu`: positive-unlabeled selection and robust distillation.
"""

from compactnn._submodules import submodule
from compactnn.datafree.bn_inversion import invert_bn
from compactnn.datafree.common import GeneratedData, artifact_record, distill_on
from compactnn.datafree.dafl import Generator, train_dafl
from compactnn.datafree.generate import generate
from compactnn.datafree.pu import pu_compress, select_in_distribution

__all__ = [
    "GeneratedData",
    "Generator",
    "artifact_record",
    "distill_on",
    "generate",
    "invert_bn",
    "pu_compress",
    "select_in_distribution",
    "train_dafl",
]


def __getattr__(name: str) -> object:
    """``compactnn.datafree.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
