"""Knowledge distillation: Hinton's softened-logit loss and feature matching through hooks."""

from compactnn._submodules import submodule
from compactnn.distill.features import FeatureDistiller
from compactnn.distill.kd import DistillationLoss, kd_loss

__all__ = ["DistillationLoss", "FeatureDistiller", "kd_loss"]


def __getattr__(name: str) -> object:
    """``compactnn.distill.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
