"""NORM: knowledge distillation via N-to-one representation matching (Liu, Li, Li, Yao,
ICLR 2023).

The student's feature ``x`` (``C_s`` channels: here the input of its classifier head) goes
through a linear student feature transform (SFT) during training:

    e = E x + b_E                  expansion to N * C_t channels
    x' = x + K e + b_K             contraction back to C_s, residual

and the head reads ``x'``. Each of the ``N`` segments of ``e`` is matched to the teacher's
feature ``f_t`` (``C_t`` channels, the input of the teacher's head):

    L_NORM = N * MSE(e, [f_t, f_t, ..., f_t])

After training the SFT is linear, so it merges exactly into the head ``y = W x' + c``:

    W' = W (I + K E),   c' = W (K b_E + b_K) + c

and the merged student has the original architecture (:meth:`NormDistiller.merge`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.errors import CompactnnError


def norm_loss(expanded: torch.Tensor, teacher: torch.Tensor, n: int) -> torch.Tensor:
    """``N * MSE(e, repeat(f_t, N))`` for ``e (B, N*C_t)`` and ``f_t (B, C_t)``.

    Example:
        >>> e, t = torch.ones(1, 4), torch.zeros(1, 2)   # N = 2, every segment off by 1
        >>> float(norm_loss(e, t, 2))
        2.0
    """
    if expanded.shape[1] != n * teacher.shape[1]:
        raise CompactnnError(
            f"NORM: the expanded feature has {expanded.shape[1]} channels, not N * C_t = "
            f"{n} * {teacher.shape[1]}."
        )
    return n * F.mse_loss(expanded, teacher.detach().repeat(1, n))


def _linear_head(model: nn.Module, name: str, side: str) -> nn.Linear:
    module = dict(model.named_modules()).get(name)
    if not isinstance(module, nn.Linear):
        raise CompactnnError(
            f"NORM: the {side} has no nn.Linear called {name!r}; name its classifier head "
            "(the linear layer whose input is the pooled feature), e.g. head='head'."
        )
    return module


class NormDistiller(nn.Module):
    """The SFT on ``student``'s head input, and the NORM loss against ``teacher``'s.

    Args:
        student: the model being trained; its head is wrapped by hooks (removed by merge).
        teacher: the reference model (its head input is recorded).
        n: the number N of segments.
        student_head, teacher_head: names of the two classifier ``nn.Linear`` layers.

    Example:
        >>> norm = NormDistiller(student, teacher, n=4)                    # doctest: +SKIP
        >>> opt = torch.optim.Adam([*student.parameters(), *norm.parameters()])
        >>> logits = student(x); _ = teacher(x); loss = ce + norm.loss()   # doctest: +SKIP
        >>> plain = norm.merge()   # the student with the SFT folded in     # doctest: +SKIP
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        n: int = 4,
        student_head: str = "head",
        teacher_head: str = "head",
    ) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise CompactnnError(f"NORM: n={n!r} must be a positive integer.")
        self.n = n
        s_head = _linear_head(student, student_head, "student")
        t_head = _linear_head(teacher, teacher_head, "teacher")
        c_s, c_t = s_head.in_features, t_head.in_features
        self.expand = nn.Linear(c_s, n * c_t)
        self.contract = nn.Linear(n * c_t, c_s)
        nn.init.zeros_(self.contract.weight)  # starts as the identity: x' = x
        nn.init.zeros_(self.contract.bias)
        self._student, self._head_name = [student], student_head
        self._expanded: torch.Tensor | None = None
        self._teacher_feat: torch.Tensor | None = None
        self.handles = [
            s_head.register_forward_pre_hook(self._student_hook),
            t_head.register_forward_pre_hook(self._teacher_hook),
        ]

    def _student_hook(self, _m, inputs):
        x = inputs[0]  # (B, C_s)
        e = self.expand(x)  # (B, N * C_t)
        self._expanded = e
        return (x + self.contract(e),)

    def _teacher_hook(self, _m, inputs):
        self._teacher_feat = inputs[0]

    def loss(self) -> torch.Tensor:
        """NORM's loss on the latest student and teacher forward passes."""
        if self._expanded is None or self._teacher_feat is None:
            raise CompactnnError("NORM: run the student and the teacher on the batch first.")
        out = norm_loss(self._expanded, self._teacher_feat, self.n)
        self._expanded = self._teacher_feat = None
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A copy of the student with the SFT folded into its head (no hooks, same layers)."""
        merged = copy.deepcopy(self._student[0])
        merged._forward_pre_hooks.clear()
        head = dict(merged.named_modules())[self._head_name]
        head._forward_pre_hooks.clear()
        w, c = head.weight.double(), head.bias
        ke = self.contract.weight.double() @ self.expand.weight.double()  # (C_s, C_s)
        shift = self.contract.weight.double() @ self.expand.bias.double() + self.contract.bias
        new_w = w @ (torch.eye(ke.shape[0], dtype=torch.float64) + ke)
        new_b = w @ shift.double() + (c.double() if c is not None else 0.0)
        head.weight.copy_(new_w.to(head.weight.dtype))
        if c is None:
            head.bias = nn.Parameter(new_b.to(head.weight.dtype))
        else:
            head.bias.copy_(new_b.to(c.dtype))
        return merged
