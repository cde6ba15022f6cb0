"""Knowledge distillation (Hinton et al., 2015): match the teacher's softened outputs.

``kd_loss = T**2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch; the
``T**2`` keeps its gradient on the scale of the hard-label loss when ``T`` changes. The
training loss mixes both: ``(1 - weight) * CE(s, y) + weight * kd_loss``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.errors import CompactnnError


def check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Refuse a teacher whose outputs do not match the student's (shape named)."""
    if not isinstance(teacher, torch.Tensor) or teacher.shape != student.shape:
        got = tuple(teacher.shape) if isinstance(teacher, torch.Tensor) else type(teacher).__name__
        raise CompactnnError(
            f"the teacher's output {got} does not match the student's "
            f"{tuple(student.shape)}: distillation needs a teacher with the same outputs "
            "(by default the float model the student was made from)."
        )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's distillation loss between logits ``(N, C)`` (or ``(..., C)``), ``T**2``-scaled.

    Example:
        >>> s, t = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> float(kd_loss(s, t))
        0.0
    """
    check_logits(student, teacher)
    c = student.shape[-1]
    log_p = F.log_softmax(student.reshape(-1, c) / temperature, dim=-1)
    log_q = F.log_softmax(teacher.detach().reshape(-1, c) / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1).mean()
    return kl * temperature**2


class DistillationLoss(nn.Module):
    """Hard-label cross entropy mixed with distillation from a frozen teacher.

    Args:
        teacher: the teacher model (put in eval mode, never trained, called without grad).
        weight: share of the distillation term, in ``[0, 1]``.
        temperature: softening temperature ``T``.
        features: optional :class:`~compactnn.distill.features.FeatureDistiller` whose loss
            (times ``feature_weight``) is added.

    Example:
        >>> loss_fn = DistillationLoss(float_model, weight=0.5)        # doctest: +SKIP
        >>> loss = loss_fn(student_logits, images, labels)             # doctest: +SKIP
    """

    def __init__(
        self,
        teacher: nn.Module,
        weight: float = 0.5,
        temperature: float = 4.0,
        features=None,
        feature_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= weight <= 1.0 or temperature <= 0:
            raise CompactnnError("distillation weight must lie in [0, 1] and temperature > 0.")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight = weight
        self.temperature = temperature
        self.features = features
        self.feature_weight = feature_weight

    def forward(self, logits: torch.Tensor, inputs, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, labels) if self.weight < 1 else logits.new_zeros(())
        if self.weight > 0 or self.features is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
            if self.weight > 0:
                kd = kd_loss(logits, teacher_logits, self.temperature)
                loss = (1 - self.weight) * loss + self.weight * kd
        if self.features is not None:
            loss = loss + self.feature_weight * self.features.loss()
        return loss
