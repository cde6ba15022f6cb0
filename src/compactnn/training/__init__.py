"""Quantization-aware training: ``train`` (the whole run), or ``prepare_qat`` + your own loop
+ ``freeze``."""

from compactnn._submodules import submodule
from compactnn.engines.qat import QATLayer
from compactnn.training.loop import evaluate_top1, train
from compactnn.training.wrap import freeze, prepare_qat

__all__ = ["QATLayer", "evaluate_top1", "freeze", "prepare_qat", "train"]


def __getattr__(name: str) -> object:
    """``compactnn.training.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
