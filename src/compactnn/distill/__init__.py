"""Knowledge distillation: Hinton's softened-logit loss and feature matching through hooks."""

from compactnn.distill.features import FeatureDistiller
from compactnn.distill.kd import DistillationLoss, kd_loss

__all__ = ["DistillationLoss", "FeatureDistiller", "kd_loss"]
