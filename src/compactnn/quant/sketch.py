"""Network Sketching (Guo, Yao, Zhao, Chen, CVPR 2017): weights as sums of binary bases.

Each filter (each output channel, or each group of ``G`` inputs of it) ``w`` in ``R^G`` is
sketched by ``m`` binary bases with real coefficients::

    w ~ sum_{j=1..m} a_j b_j,      b_j in {-1, +1}^G

*Direct approximation* (coarse to fine, greedy on the residual)::

    r_0 = w,   b_j = sign(r_{j-1}),   a_j = <b_j, r_{j-1}> / G = mean|r_{j-1}|,
    r_j = r_{j-1} - a_j b_j

*Refined approximation*: the coefficients are refit by least squares after each new basis,
``a = argmin ||w - B a||^2 = (B^T B)^{-1} B^T w`` with ``B = [b_1 ... b_j]``, and the signs
re-estimated; compactnn alternates the two exact steps until the error stops falling:
``a <- lstsq(B, w)``, then each weight takes the nearest of the ``2^m`` values
``sum_j +-a_j`` (the exact minimiser over the signs for fixed ``a``). Both steps can only
lower ``||w - B a||``, and the refinement starts from the direct sketch (and from the greedy
least-squares one; the better is kept per filter), so refined <= direct on every filter.

Storage: an ``m``-bit code per weight (bit ``j``, most significant first, is ``b_j > 0``)
and the ``m`` float16 coefficients ``a_j`` per filter (``weight.basis``, a binary-basis
codebook layer, :mod:`compactnn.core.basis`): the levels ``sum_j +-a_j`` are recomputed from
them at load, bit-exactly. For ``m = 2`` and 3x3 filters of 64 inputs that is
``2 + 32 / 576 = 2.06`` bits per weight.

Post-training through :func:`compactnn.compress` (recipe ``w2-sketch``: two bases); the same
quantizer trains through :func:`compactnn.train` (straight-through gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from compactnn.core.basis import basis_levels, sign_table
from compactnn.core.quantize import grouped_view
from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import WeightExport, fp16
from compactnn.errors import CompactnnError
from compactnn.quant.base import short_weight_spec
from compactnn.registry import register


def codes_of_bases(bases: torch.Tensor) -> torch.Tensor:
    """``(N, G)`` codes of bases ``(N, G, m)`` in ``{-1, +1}`` (bit ``j`` is ``b_j > 0``)."""
    m = bases.shape[-1]
    weights = 2 ** torch.arange(m - 1, -1, -1, device=bases.device)
    return ((bases > 0).long() * weights).sum(-1)


def bases_of_codes(codes: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of :func:`codes_of_bases`: ``(N, G, m)`` signs."""
    return sign_table(m).to(codes.device)[codes]


def reconstruct(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``(N, G)`` weights of codes ``(N, G)`` on per-row levels ``(N, L)``."""
    return torch.gather(levels, 1, codes)


def nearest_codes(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``(N, G)`` index of the level nearest each weight (the exact sign step)."""
    return (w.unsqueeze(-1) - levels.unsqueeze(1)).abs().argmin(-1)


def least_squares(bases: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(N, m)`` coefficients ``argmin_a ||w - B a||`` per row (rank-deficient B allowed)."""
    sol = torch.linalg.lstsq(bases.double(), w.double().unsqueeze(-1), driver="gelsd")
    return sol.solution.squeeze(-1).to(w.dtype)


def sketch_direct(w: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The direct sketch of rows ``w`` ``(N, G)``: bases ``(N, G, m)``, coefficients ``(N, m)``."""
    r = w.clone()
    bases, alphas = [], []
    for _ in range(m):
        b = torch.where(r >= 0, 1.0, -1.0).to(w)
        a = r.abs().mean(-1, keepdim=True)  # <b, r> / G
        r = r - a * b
        bases.append(b)
        alphas.append(a)
    return torch.stack(bases, -1), torch.cat(alphas, -1)


def sketch_greedy_ls(w: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy bases with all coefficients refit by least squares after each new basis."""
    r = w.clone()
    bases: list[torch.Tensor] = []
    alpha = w.new_zeros(w.shape[0], 0)
    for _ in range(m):
        bases.append(torch.where(r >= 0, 1.0, -1.0).to(w))
        b = torch.stack(bases, -1)
        alpha = least_squares(b, w)
        r = w - (b @ alpha.unsqueeze(-1)).squeeze(-1)
    return torch.stack(bases, -1), alpha


def sketch_error(w: torch.Tensor, codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` squared reconstruction error per row."""
    return (w - reconstruct(codes, levels)).pow(2).sum(-1)


def alternate(
    w: torch.Tensor, bases: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Alternating least squares from ``bases``: returns codes, coefficients ``(N, m)`` and
    the total squared error after each iteration (non-increasing)."""
    m = bases.shape[-1]
    codes = codes_of_bases(bases)
    alpha = least_squares(bases, w)
    history: list[float] = []
    for _ in range(iters):
        alpha = least_squares(bases_of_codes(codes, m), w)
        levels = basis_levels(alpha)
        new_codes = nearest_codes(w, levels)
        history.append(float(sketch_error(w, new_codes, levels).sum()))
        if torch.equal(new_codes, codes) and len(history) > 1:
            break
        codes = new_codes
    return codes, alpha, history


def sketch_basis(
    w: torch.Tensor, m: int, refine: bool = True, iters: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch rows ``w`` ``(N, G)`` with ``m`` bases: codes ``(N, G)`` in ``[0, 2^m)`` and
    float16-representable coefficients ``(N, m)`` (what the artifact stores); the levels are
    ``basis_levels(coefficients)``.

    Refined: the alternating refinement from the direct sketch and from the greedy
    least-squares one, each finished by the exact sign step on its float16 levels; per row
    the best of those and the direct sketch is kept, so refined <= direct on every row.

    Example:
        >>> codes, basis = sketch_basis(torch.tensor([[3.0, -1.0, 1.0, -3.0]]), 2)
        >>> basis.tolist(), codes.tolist()
        ([[2.0, 1.0]], [[3, 1, 2, 0]])
    """
    w = w.detach().float()
    bases, alpha = sketch_direct(w, m)
    best_codes, best_alpha = codes_of_bases(bases), fp16(alpha)
    if not refine:
        return best_codes, best_alpha
    best_err = sketch_error(w, best_codes, basis_levels(best_alpha))
    for start in (bases, sketch_greedy_ls(w, m)[0]):
        _, alpha, _ = alternate(w, start, max(iters, 1))
        alpha = fp16(alpha)
        levels = basis_levels(alpha)
        codes = nearest_codes(w, levels)  # exact on the stored (float16) coefficients
        err = sketch_error(w, codes, levels)
        better = err < best_err
        best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
        best_alpha = torch.where(better.unsqueeze(-1), alpha, best_alpha)
        best_err = torch.minimum(err, best_err)
    return best_codes, best_alpha


def sketch_rows(
    w: torch.Tensor, m: int, refine: bool = True, iters: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sketch_basis` as codes ``(N, G)`` and levels ``(N, 2^m)`` (float32, exactly
    :func:`~compactnn.core.basis.basis_levels` of the float16 coefficients).

    Example:
        >>> codes, levels = sketch_rows(torch.tensor([[3.0, -1.0, 1.0, -3.0]]), 2)
        >>> reconstruct(codes, levels).tolist()
        [[3.0, -1.0, 1.0, -3.0]]
    """
    codes, basis = sketch_basis(w, m, refine, iters)
    return codes, basis_levels(basis)


class SketchWeight(nn.Module):
    """Weights sketched by ``m = spec.bits`` binary bases per filter (or group).

    ``forward`` returns the sketch with a straight-through gradient (QAT); ``export`` its
    codes and per-filter codebook (levels of the float16 coefficients).
    """

    def __init__(self, spec: QuantSpec, refine: bool = True, iters: int = 20) -> None:
        super().__init__()
        self.spec, self.refine, self.iters = spec, refine, iters

    def sketch(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Codes ``(R * ngroups, G)``, coefficients ``(R * ngroups, m)``, grouped shape."""
        g = grouped_view(w.detach().float(), self.spec.granularity, self.spec.group_size)
        rows = g.reshape(-1, g.shape[-1])  # (R * ngroups, G)
        codes, basis = sketch_basis(rows, self.spec.bits, self.refine, self.iters)
        return codes, basis, tuple(g.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, basis, _ = self.sketch(w)
        w_hat = reconstruct(codes, basis_levels(basis)).reshape(w.shape).to(w.dtype)
        return w + (w_hat - w).detach()

    def export(self, w: torch.Tensor) -> WeightExport:
        codes, basis, (r, ng, _) = self.sketch(w)
        q = (codes + self.spec.qtype.qmin).reshape(w.shape)
        levels = basis_levels(basis).reshape(r, ng, -1)
        basis = basis.reshape(r, ng, -1)
        return WeightExport(q, torch.ones(r, ng), torch.zeros(r, ng), self.spec, levels, basis)


@dataclass(frozen=True)
class SketchConfig(QATConfig):
    """Network Sketching: ``weight.bits`` binary bases per output channel (or per group).

    Post-training with :func:`compactnn.compress` (``w2-sketch``: weight-only, two bases);
    a weight quantizer of QAT with :func:`compactnn.train`. First and last layers keep the
    8-bit convention (``first_last_bits``).

    Args:
        refine: refit coefficients by least squares and re-estimate signs (the paper's
            "approximation with refinement"); False: the direct approximation.
        iters: alternating refinement iterations at most (stops earlier at a fixed point).
    """

    # The method is post-training (the paper's basic form needs no retraining): what
    # compress makes is the method, not an untrained stand-in for it (no "train it" note,
    # no "calibrated only, not trained" label: compactnn.report.delivery.training_recipe).
    post_training: ClassVar[bool] = True

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(2))
    act: QuantSpec | None = None
    epochs: int = 3
    refine: bool = True
    iters: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.weight.bits <= 4:
            raise CompactnnError(
                f"sketch: weight.bits={self.weight.bits} is the number of binary bases, 1..4; "
                "use w1-sketch .. w4-sketch."
            )
        if self.weight.granularity == "tensor":
            raise CompactnnError(
                "sketch: bases are per filter; use granularity='channel' or 'group'."
            )
        if not isinstance(self.iters, int) or self.iters < 1:
            raise CompactnnError(f"sketch: iters={self.iters!r} must be a positive integer.")


def sketch_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: SketchConfig) -> nn.Module:
    """Engine hook: the sketch of ``spec.bits`` bases (activations: LSQ when quantized)."""
    return SketchWeight(spec, config.refine, config.iters)


register("sketch", SketchConfig, "Network Sketching: m binary bases per filter, refined")(
    QATMethod(sketch_weight_quantizer)
)
