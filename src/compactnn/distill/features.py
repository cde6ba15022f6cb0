"""Feature distillation: match intermediate outputs of student and teacher through hooks.

Forward hooks record the output of named modules on both models during their forward
passes; ``loss()`` is the mean squared error between each recorded pair (FitNets-style
hints, without a regressor: the pairs must have equal shapes, as a quantized copy of the
teacher has).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.errors import CompactnnError


class FeatureDistiller:
    """Records ``student[name]`` and ``teacher[name]`` outputs; ``loss()`` compares them.

    Args:
        student: the model being trained.
        teacher: the reference model.
        pairs: ``{student_module_name: teacher_module_name}``; a list of names pairs each
            name with itself (a quantized student keeps its float model's names).

    Example:
        >>> fd = FeatureDistiller(student, teacher, ["features.3"])   # doctest: +SKIP
        >>> logits = student(x); _ = teacher(x); extra = fd.loss()   # doctest: +SKIP
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs) -> None:
        if not isinstance(pairs, dict):
            pairs = {n: n for n in pairs}
        if not pairs:
            raise CompactnnError("feature distillation needs at least one module name.")
        self.pairs = dict(pairs)
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}
        self.handles = []
        for side, model, names in (
            ("student", student, self.pairs.keys()),
            ("teacher", teacher, self.pairs.values()),
        ):
            modules = dict(model.named_modules())
            for n in names:
                if n not in modules:
                    raise CompactnnError(
                        f"feature distillation: the {side} has no module {n!r}; pick names "
                        "from model.named_modules()."
                    )
                self.handles.append(modules[n].register_forward_hook(self._hook(side, n)))

    def _hook(self, side: str, name: str):
        def hook(_module, _inputs, output):
            self.outputs[(side, name)] = output

        return hook

    def loss(self) -> torch.Tensor:
        """Mean over pairs of the MSE between the latest student and teacher outputs."""
        total = None
        for s_name, t_name in self.pairs.items():
            s = self.outputs.get(("student", s_name))
            t = self.outputs.get(("teacher", t_name))
            if s is None or t is None:
                raise CompactnnError(
                    f"feature distillation: {s_name!r} or {t_name!r} did not run; run both "
                    "models on the batch before calling loss()."
                )
            if s.shape != t.shape:
                raise CompactnnError(
                    f"feature distillation: student {s_name!r} gives {tuple(s.shape)} but "
                    f"teacher {t_name!r} gives {tuple(t.shape)}; pair modules of equal shape."
                )
            term = F.mse_loss(s, t.detach())
            total = term if total is None else total + term
        self.outputs.clear()
        return total / len(self.pairs)

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
