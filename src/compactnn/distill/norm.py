"""NORM: knowledge distillation via N-to-one representation matching (Liu, Li, Li, Yao,
ICLR 2023).

The student's feature ``x`` (``C_s`` channels) goes through a linear student feature
transform (SFT) during training:

    e = E x + b_E                  expansion to N * C_t channels
    x' = x + K e + b_K             contraction back to C_s, residual

and the rest of the student reads ``x'``. Each of the ``N`` segments of ``e`` is matched to
the teacher's feature ``f_t`` (``C_t`` channels):

    L_NORM = N * MSE(e, [f_t, f_t, ..., f_t])

Two placements:

* ``student_feature``/``teacher_feature`` given (the paper's form): ``x`` and ``f_t`` are the
  last stage's feature *maps* before global pooling, ``E`` and ``K`` are 1x1 convolutions each
  followed by BatchNorm, and the teacher's map is max-pooled to the student's size when they
  differ. BatchNorm in eval mode is a per-channel affine map, so the SFT stays linear.
* otherwise: ``x`` and ``f_t`` are the inputs of the two classifier heads (pooled vectors),
  ``E`` and ``K`` plain linear layers.

After training the SFT is linear and commutes with global average pooling, so it merges
exactly into the head ``y = W pool(x') + c``:

    W' = W (I + K E),   c' = W (K b_E + b_K) + c

(with the BatchNorms folded into ``E, b_E, K, b_K`` first), and the merged student has the
original architecture (:meth:`NormDistiller.merge`; it checks the merged outputs against
the wrapped ones on the latest batch).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.errors import CompactnnError


def norm_loss(expanded: torch.Tensor, teacher: torch.Tensor, n: int) -> torch.Tensor:
    """``N * MSE(e, repeat(f_t, N))`` for ``e (B, N*C_t, ...)`` and ``f_t (B, C_t, ...)``.

    Example:
        >>> e, t = torch.ones(1, 4), torch.zeros(1, 2)   # N = 2, every segment off by 1
        >>> float(norm_loss(e, t, 2))
        2.0
    """
    if expanded.shape[1] != n * teacher.shape[1] or expanded.shape[2:] != teacher.shape[2:]:
        raise CompactnnError(
            f"NORM: the expanded feature has shape {tuple(expanded.shape)}, not N * C_t = "
            f"{n} * {teacher.shape[1]} channels of size {tuple(teacher.shape[2:])}."
        )
    reps = (1, n) + (1,) * (teacher.dim() - 2)
    return n * F.mse_loss(expanded, teacher.detach().repeat(*reps))


def _module(model: nn.Module, name: str, side: str, kind: type, what: str) -> nn.Module:
    module = dict(model.named_modules()).get(name)
    if not isinstance(module, kind):
        raise CompactnnError(
            f"NORM: the {side} has no nn.{kind.__name__} called {name!r}; name {what}."
        )
    return module


def _linear_head(model: nn.Module, name: str, side: str) -> nn.Linear:
    what = "its classifier head (the linear layer whose input is the pooled feature)"
    return _module(model, name, side, nn.Linear, what + ", e.g. head='head'")


def _channels(model: nn.Module, name: str, side: str, probe: torch.Tensor) -> tuple:
    """The shape of module ``name``'s output on ``probe`` (a 4-D feature map expected)."""
    module = _module(model, name, side, nn.Module, "its last stage, e.g. 'features'")
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        handle.remove()
        model.train(was)
    if not seen or len(seen[0]) != 4:
        raise CompactnnError(
            f"NORM: the {side}'s {name!r} does not output a (batch, channels, H, W) map; "
            "name the last convolutional stage, or omit the feature names (head inputs)."
        )
    return tuple(seen[0][1:])


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out))


def _affine(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, b)`` of a linear layer / 1x1 conv (+ eval BatchNorm) as ``y = A x + b``."""
    if isinstance(layer, nn.Linear):
        return layer.weight.double(), layer.bias.double()
    conv, bn = layer[0], layer[1]
    a = conv.weight.double().flatten(1)  # (out, in)
    b = conv.bias.double()
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return s[:, None] * a, s * (b - bn.running_mean.double()) + bn.bias.double()


class NormDistiller(nn.Module):
    """The SFT on ``student``'s feature, and the NORM loss against ``teacher``'s.

    Args:
        student: the model being trained; hooks wrap its feature (removed by merge).
        teacher: the reference model (its feature is recorded).
        n: the number N of segments.
        student_head, teacher_head: names of the two classifier ``nn.Linear`` layers.
        student_feature, teacher_feature: names of the last stages whose output maps are
            matched (the paper's form; the student's map must reach the head through global
            average pooling only); None (both): the heads' inputs.
        probe: one input batch, needed with feature names (to read the maps' shapes).

    Example:
        >>> norm = NormDistiller(student, teacher, n=4)                    # doctest: +SKIP
        >>> opt = torch.optim.Adam([*student.parameters(), *norm.parameters()])  # doctest: +SKIP
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
        student_feature: str | None = None,
        teacher_feature: str | None = None,
        probe: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise CompactnnError(f"NORM: n={n!r} must be a positive integer.")
        if (student_feature is None) != (teacher_feature is None):
            raise CompactnnError(
                "NORM: give both student_feature and teacher_feature (the paper's maps), or "
                "neither (the heads' inputs)."
            )
        self.n = n
        s_head = _linear_head(student, student_head, "student")
        t_head = _linear_head(teacher, teacher_head, "teacher")
        self.maps = student_feature is not None
        if self.maps:
            if probe is None:
                raise CompactnnError("NORM: feature maps need probe=<one input batch>.")
            c_s, *self._size = _channels(student, student_feature, "student", probe[:2])
            c_t = _channels(teacher, teacher_feature, "teacher", probe[:2])[0]
            self.expand, self.contract = _conv_bn(c_s, n * c_t), _conv_bn(n * c_t, c_s)
            nn.init.zeros_(self.contract[1].weight)  # starts as the identity: x' = x
            s_mod = dict(student.named_modules())[student_feature]
            t_mod = dict(teacher.named_modules())[teacher_feature]
            hooks = [
                s_mod.register_forward_hook(lambda _m, _i, out: self._sft(out)),
                t_mod.register_forward_hook(lambda _m, _i, out: self._record(out)),
            ]
        else:
            c_s, c_t = s_head.in_features, t_head.in_features
            self.expand = nn.Linear(c_s, n * c_t)
            self.contract = nn.Linear(n * c_t, c_s)
            nn.init.zeros_(self.contract.weight)  # starts as the identity: x' = x
            nn.init.zeros_(self.contract.bias)
            hooks = [
                s_head.register_forward_pre_hook(lambda _m, i: (self._sft(i[0]),)),
                t_head.register_forward_pre_hook(lambda _m, i: self._record(i[0])),
            ]
        self._student, self._head_name = [student], student_head
        self._expanded: torch.Tensor | None = None
        self._teacher_feat: torch.Tensor | None = None
        self._last_input: torch.Tensor | None = None
        hooks.append(student.register_forward_pre_hook(self._keep_input))
        self.handles = hooks

    def _keep_input(self, _m, inputs):
        self._last_input = inputs[0][:8].detach()

    def _sft(self, x: torch.Tensor) -> torch.Tensor:
        e = self.expand(x)  # (B, N * C_t[, H, W])
        self._expanded = e
        return x + self.contract(e)

    def _record(self, f: torch.Tensor) -> None:
        if self.maps and tuple(f.shape[2:]) != tuple(self._size):
            f = F.adaptive_max_pool2d(f, self._size)  # the paper pools the teacher's map
        self._teacher_feat = f

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
        """A copy of the student with the SFT folded into its head (no hooks, same layers).

        With feature maps the BatchNorms are folded at their running statistics. The merged
        outputs are checked against the wrapped student's on the latest batch (eval mode).
        """
        student = self._student[0]
        self._expanded = self._teacher_feat = None
        merged = copy.deepcopy(student, memo={id(self): self})  # hooks: not copied along
        for module in merged.modules():
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        head = dict(merged.named_modules())[self._head_name]
        e_w, e_b = _affine(self.expand)
        k_w, k_b = _affine(self.contract)
        w, c = head.weight.double(), head.bias
        new_w = w @ (torch.eye(k_w.shape[0], dtype=torch.float64) + k_w @ e_w)
        new_b = w @ (k_w @ e_b + k_b) + (c.double() if c is not None else 0.0)
        head.weight.copy_(new_w.to(head.weight.dtype))
        if c is None:
            head.bias = nn.Parameter(new_b.to(head.weight.dtype))
        else:
            head.bias.copy_(new_b.to(c.dtype))
        if self._last_input is not None:
            self._check(student, merged)
        return merged

    def _check(self, student: nn.Module, merged: nn.Module) -> None:
        modes = [(m, m.training) for m in (student, merged, self)]
        for m, _ in modes:
            m.eval()
        try:
            wrapped, out = student(self._last_input), merged(self._last_input)
        finally:
            for m, was in modes:
                m.train(was)
            self._expanded = None
        if not torch.allclose(out, wrapped, atol=1e-4, rtol=1e-4):
            raise CompactnnError(
                "NORM: the merged student differs from the wrapped one; the student's feature "
                "map must reach its head through global average pooling only."
            )
