"""DCM: dense cross-layer mutual distillation (Yao & Sun, ECCV 2020).

Auxiliary classifiers (global average pooling, then a linear layer) are attached to hidden
layers of both networks. With heads ``s_1..s_m`` on the student (its final classifier last)
and ``t_1..t_k`` on the teacher, and ``p = softmax(logits / T)``:

    L = sum_i CE(s_i, y) + sum_j CE(t_j, y)
        + sum_{i,j} [ KL(sg(p_{t_j}) || p_{s_i}) + KL(sg(p_{s_i}) || p_{t_j}) ] * T^2

``sg`` stops the gradient: every head learns from every head of the other network, in both
directions (dense, cross-layer, mutual). Which networks learn is the caller's optimizer's
choice: with the teacher's backbone frozen (``teacher.eval().requires_grad_(False)``) only
its auxiliary heads learn from the student; with its parameters in the optimizer both
networks train together as in the paper. The auxiliary heads are discarded after training:
the student's own modules are never replaced (hooks only; :meth:`DCMDistiller.remove`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.modules import eval_mode
from compactnn.errors import CompactnnError


def _kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(target_logits.detach() / temperature, 1)
    log_p = F.log_softmax(logits / temperature, 1)
    return (log_q.exp() * (log_q - log_p)).sum(1).mean() * temperature**2


def dcm_loss(
    student_heads: list[torch.Tensor],
    teacher_heads: list[torch.Tensor],
    labels: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """DCM's loss (module docstring) on the logits of every head of both networks.

    Example:
        >>> z = [torch.zeros(2, 3)]   # uniform heads: CE = log 3 each, every KL = 0
        >>> round(float(dcm_loss(z, z, torch.tensor([0, 1]))), 4)
        2.1972
    """
    ce = sum(F.cross_entropy(h, labels) for h in [*student_heads, *teacher_heads])
    kl = sum(
        _kl(t, s, temperature) + _kl(s, t, temperature)
        for s in student_heads
        for t in teacher_heads
    )
    return ce + kl


class _AuxHead(nn.Module):
    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.flatten(2).mean(2)  # global average pool: (B, C, ...) -> (B, C)
        return self.fc(x)


class DCMDistiller(nn.Module):
    """Auxiliary heads on named layers of student and teacher, and DCM's loss.

    Args:
        student: the model being trained.
        teacher: the other network (it trains only if the optimizer holds its parameters).
        student_layers, teacher_layers: module names that get an auxiliary classifier.
        example: one input batch, run once through both networks in eval mode to size the
            heads (neither network changes: modes and batch-norm statistics are kept).
        temperature: ``T`` of the KL terms (1 in the paper).

    Example:
        >>> dcm = DCMDistiller(  # doctest: +SKIP
        ...     student, teacher, ["features.1"], ["features.2"], x[:2]
        ... )
        >>> loss = dcm.loss(student(x), teacher(x), y)                      # doctest: +SKIP
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layers: list[str],
        teacher_layers: list[str],
        example: torch.Tensor,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise CompactnnError(f"DCM: temperature={temperature!r} must be positive.")
        self.temperature = temperature
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        self._names: dict[str, list[str]] = {}
        try:  # on an error, no hook is left on either network
            self._attach("student", student, student_layers)
            self._attach("teacher", teacher, teacher_layers)
            self.heads = self._sized_heads(student, teacher, example)
        except BaseException:
            self.remove()
            raise

    def _attach(self, side: str, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        for n in names:
            if n not in modules:
                raise CompactnnError(
                    f"DCM: the {side} has no module {n!r}; pick names from model.named_modules()."
                )
            self.handles.append(modules[n].register_forward_hook(self._hook(f"{side}:{n}")))
        self._names[side] = [f"{side}:{n}" for n in names]

    def _sized_heads(
        self, student: nn.Module, teacher: nn.Module, example: torch.Tensor
    ) -> nn.ModuleDict:
        """An auxiliary head per hooked layer, sized by one forward of both networks."""
        with torch.no_grad(), eval_mode(student, teacher):
            s_out, t_out = student(example), teacher(example)
        classes = s_out.shape[1]
        if t_out.shape[1] != classes:
            raise CompactnnError(
                f"DCM: the student has {classes} outputs, the teacher {t_out.shape[1]}."
            )
        keys = self._names["student"] + self._names["teacher"]
        heads = {k.replace(".", "_"): _AuxHead(self.outputs[k].shape[1], classes) for k in keys}
        self.outputs.clear()
        return nn.ModuleDict(heads)

    def _hook(self, key: str):
        def hook(_m, _inputs, output):
            self.outputs[key] = output

        return hook

    def head_logits(self, side: str) -> list[torch.Tensor]:
        return [self.heads[k.replace(".", "_")](self.outputs[k]) for k in self._names[side]]

    def loss(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """DCM's loss after one forward pass of each network on the batch."""
        missing = [
            k for k in self._names["student"] + self._names["teacher"] if k not in self.outputs
        ]
        if missing:
            raise CompactnnError(f"DCM: {missing} did not run; run both models first.")
        s = [*self.head_logits("student"), student_logits]
        t = [*self.head_logits("teacher"), teacher_logits]
        self.outputs.clear()
        return dcm_loss(s, t, labels, self.temperature)

    def remove(self) -> None:
        """Remove the hooks: the student is its plain self again."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
