"""Quantization-aware training: ``train`` (the whole run), or ``prepare_qat`` + your own loop
+ ``freeze``."""

from compactnn.train.loop import evaluate_top1, train
from compactnn.train.wrap import QATLayer, freeze, prepare_qat

__all__ = ["QATLayer", "evaluate_top1", "freeze", "prepare_qat", "train"]
