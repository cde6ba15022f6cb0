"""LQ-Nets (Zhang, Yang, Ye, Hua, ECCV 2018): learned quantizers as binary-basis combinations.

A ``K``-bit quantizer is a learned basis ``v`` in ``R^K``; its ``2^K`` levels are every
combination ``v^T b`` of the basis with a binary code ``b``::

    weights (per output channel):  b in {-1, +1}^K      levels  sum_j +-v_j
    activations (per layer):       b in { 0, 1}^K       levels  v_0 + sum_j b_j v_j

A value is encoded by its nearest level (``Q(x) = v^T b*``, ``b*`` the code of the nearest
level) and the network trains through the quantizer with a straight-through gradient
(activations: clipped to the levels' range). The basis is not learned by gradient but by the
paper's *quantization error minimization* (QEM): after the forward pass, with the codes
``B`` (``N x K``, one row per value ``x_n`` of the channel or of the batch) fixed, ::

    v* = argmin_v ||B v - x||^2 = (B^T B)^{-1} B^T x,      v <- m v + (1 - m) v*

with the momentum ``m = 0.9``, on every training step. ``B^T B`` and ``B^T x`` come from the
codes' histogram (``sum_c n_c b_c b_c^T``, ``sum_c s_c b_c`` with ``n_c`` the count and
``s_c`` the sum of the values on code ``c``), so a step costs ``O(N)``. A tiny ridge toward
the current basis (``(B^T B + eps I) v* = B^T x + eps v``) keeps the component of a code
bit that no value uses where it was, so an unused level is never dragged to 0. Encoding is
the exact minimiser over the codes for a fixed basis and QEM over the basis for fixed codes,
so alternating them never raises the error (:func:`fit_basis`, used to initialise).

Activations entering a layer after ReLU are non-negative: levels ``sum_j b_j v_j`` include 0
(``v_0 = 0``). For inputs that take negative values (observed on the calibration data),
compactnn adds a learned offset ``v_0`` (a constant column of ``B`` in QEM), so the grid
``v_0 + {0,1}^K v`` can cover a signed range; the paper does not treat that case.

Storage: each weight is a ``K``-bit code (bit ``j``, most significant first, set means
``b_j = +1``) on a per-channel codebook of the ``2^K`` levels; activations are a sorted
non-uniform input grid of ``2^K`` float16 levels. Training computes with exactly the stored
values, so the frozen model reproduces training's forward.

Recipe: ``w2a2-lqnets`` (``w<K_w>a<K_a>-lqnets``, ``K_w`` 1..4, ``K_a`` 2..4), trained with
:func:`compactnn.train`; first and last layers keep the 8-bit convention (LSQ there).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from compactnn.core.basis import basis_levels, binary01_levels, bit_table, sign_table
from compactnn.core.quantize import grouped_view
from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import WeightExport, fp16
from compactnn.errors import CompactnnError
from compactnn.quant.base import short_act_spec, short_weight_spec
from compactnn.registry import register

INITS = ("grid", "fit")
# the engine installs a binary basis (WeightExport.basis -> set_codebook(levels, basis=)):
# then the levels are the float32 sums of the float16 basis, else float16 levels
BASIS_SEAM = "basis" in {f.name for f in fields(WeightExport)}
SAMPLE_PER_BATCH = 8192  # activation values kept per calibration batch to initialise the basis


def code_table(k: int, signed: bool) -> torch.Tensor:
    """``(2^K, K)``: row ``q`` is code ``q``'s binary vector, bit ``j`` most significant
    first; a set bit is ``+1``, a clear one ``-1`` (``signed``) or ``0``.

    Example:
        >>> code_table(2, True).tolist()
        [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]
    """
    return sign_table(k) if signed else bit_table(k)


def levels_of(basis: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(..., 2^K)`` levels ``table @ v`` of bases ``(..., K)`` (float32; QEM's view)."""
    return basis.float() @ table.to(basis.device).T


def nearest_codes(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``(R, N)`` index of the level ``(R, L)`` nearest each value of ``x`` ``(R, N)``
    (the lowest index on a tie): the exact encoding step for a fixed basis."""
    return (x.unsqueeze(-1) - levels.unsqueeze(1)).abs().argmin(-1)


def nearest_sorted(x: torch.Tensor, sorted_levels: torch.Tensor) -> torch.Tensor:
    """Index into sorted 1-D levels of the nearest level of each value: thresholds at the
    float32 midpoints, a value on a midpoint goes up (what a frozen non-uniform
    ``ActQuantizer`` computes)."""
    mids = (sorted_levels[:-1] + sorted_levels[1:]) / 2
    return torch.bucketize(x, mids, right=True)


def code_stats(codes: torch.Tensor, x: torch.Tensor, n_codes: int):
    """Per row: ``(R, L)`` count and ``(R, L)`` sum of the values of ``x`` on each code."""
    counts = torch.zeros(codes.shape[0], n_codes, dtype=torch.float64, device=x.device)
    sums = torch.zeros_like(counts)
    counts.scatter_add_(1, codes, torch.ones_like(x, dtype=torch.float64))
    sums.scatter_add_(1, codes, x.double())
    return counts, sums


def qem_solve(
    counts: torch.Tensor,
    sums: torch.Tensor,
    table: torch.Tensor,
    v_old: torch.Tensor,
    ridge: float = 1e-6,
) -> torch.Tensor:
    """The QEM basis ``(R, K)``: ``(B^T B + eps I) v = B^T x + eps v_old`` per row, with
    ``B^T B = sum_c n_c b_c b_c^T`` and ``B^T x = sum_c s_c b_c`` from the code statistics
    ``(R, L)`` (``b_c``: row ``c`` of ``table`` ``(L, K)``) and ``eps = ridge * N``."""
    t = table.to(counts)
    btb = torch.einsum("lk,rl,lj->rkj", t, counts, t)  # (R, K, K)
    btx = sums @ t  # (R, K)
    eps = ridge * counts.sum(-1).clamp(min=1.0)  # (R,)
    eye = torch.eye(t.shape[1], dtype=t.dtype, device=t.device)
    lhs = btb + eps[:, None, None] * eye
    rhs = btx + eps[:, None] * v_old.double()
    return torch.linalg.solve(lhs, rhs).to(v_old.dtype).contiguous()


def qem_step(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, v_old: torch.Tensor):
    """One QEM basis ``(R, K)`` for values ``x`` ``(R, N)`` with fixed codes ``(R, N)``.

    Example:
        >>> t = code_table(1, True)
        >>> qem_step(torch.tensor([[0.5, -1.5]]), torch.tensor([[1, 0]]), t, torch.ones(1, 1))
        tensor([[1.]])
    """
    return qem_solve(*code_stats(codes, x, table.shape[0]), table, v_old)


def quant_error(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``(R,)`` squared error of encoding rows ``x`` ``(R, N)`` on levels ``(R, L)``."""
    codes = nearest_codes(x, levels)
    return (x - torch.gather(levels, 1, codes)).pow(2).sum(-1)


def grid_basis(top: torch.Tensor, k: int, signed: bool) -> torch.Tensor:
    """``(R, K)`` basis of the uniform grid reaching ``top`` ``(R,)``: ``v_j = s 2^(K-1-j)``
    with ``s = top / (2^K - 1)`` (levels ``s {-(2^K-1), .., -1, 1, .., 2^K-1}`` signed,
    ``s {0, 1, .., 2^K-1}`` unsigned)."""
    powers = 2.0 ** torch.arange(k - 1, -1, -1, dtype=torch.float32)
    return (top.float().clamp(min=1e-8) / (2**k - 1)).unsqueeze(-1) * powers


def fit_basis(
    x: torch.Tensor, basis: torch.Tensor, table: torch.Tensor, iters: int
) -> tuple[torch.Tensor, list[float]]:
    """Alternate nearest-level encoding and the full QEM step (momentum 0) on rows ``x``
    ``(R, N)`` from ``basis`` ``(R, K)``; returns the basis and the total squared error
    before each step (non-increasing)."""
    history: list[float] = []
    for _ in range(iters):
        levels = levels_of(basis, table)
        codes = nearest_codes(x, levels)
        history.append(float((x - torch.gather(levels, 1, codes)).pow(2).sum()))
        basis = qem_step(x, codes, table, basis)
    return basis, history


class LQWeight(nn.Module):
    """Per-row (output channel, or group) basis on ``{-1, +1}^K`` codes, QEM-updated.

    Args:
        weight: the float weight (initialises the basis).
        spec: the layer's weight spec (``bits = K``, granularity of the rows).
        momentum: QEM's moving-average factor ``m``.
        init: ``"grid"`` (uniform grid up to each row's max |w|) or ``"fit"`` (that grid
            refined by ``iters`` encode/QEM steps on the weights).
    """

    def __init__(
        self, weight: torch.Tensor, spec: QuantSpec, momentum: float, init: str, iters: int
    ) -> None:
        super().__init__()
        self.spec, self.momentum = spec, momentum
        self.register_buffer("table", code_table(spec.bits, True), persistent=False)
        rows = self.rows(weight)  # (R, N)
        basis = grid_basis(rows.abs().amax(-1), spec.bits, True)
        if init == "fit":
            basis, _ = fit_basis(rows, basis, self.table, iters)
        self.register_buffer("basis", basis)  # (R, K)

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        g = grouped_view(w.detach().float(), self.spec.granularity, self.spec.group_size)
        return g.reshape(-1, g.shape[-1])  # (R * ngroups, G)

    def stored_basis(self) -> torch.Tensor:
        """The basis as the artifact stores it (float16-representable)."""
        return fp16(self.basis)

    def levels(self) -> torch.Tensor:
        """``(R, 2^K)`` levels exactly as the frozen layer computes them: from the stored
        basis (float32, :func:`~compactnn.core.basis.basis_levels`), or rounded to float16
        where the engine can only install levels."""
        levels = basis_levels(self.stored_basis())
        return levels if BASIS_SEAM else fp16(levels)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        rows, levels = self.rows(w), self.levels()
        codes = nearest_codes(rows, levels)
        w_hat = torch.gather(levels, 1, codes).reshape(w.shape).to(w.dtype)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                new = qem_step(rows, codes, self.table, self.basis)
                self.basis.mul_(self.momentum).add_((1 - self.momentum) * new)
        return w + (w_hat - w).detach()

    def export(self, w: torch.Tensor) -> WeightExport:
        """Codes on the per-row codebook of the stored basis's levels."""
        levels = self.levels()
        g = grouped_view(w.detach().float(), self.spec.granularity, self.spec.group_size)
        r, ng, _ = g.shape
        codes = nearest_codes(self.rows(w), levels)
        q = (codes + self.spec.qtype.qmin).reshape(w.shape)
        ones, zeros, levels = torch.ones(r, ng), torch.zeros(r, ng), levels.reshape(r, ng, -1)
        if not BASIS_SEAM:
            return WeightExport(q, ones, zeros, self.spec, levels)
        basis = self.stored_basis().reshape(r, ng, -1)
        return WeightExport(q, ones, zeros, self.spec, levels, basis=basis)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, rows={self.basis.shape[0]}, momentum={self.momentum}"


class LQAct(nn.Module):
    """One basis per layer on ``{0, 1}^K`` codes (plus an offset for signed inputs).

    Before training, ``observe`` mode keeps a sample of the calibration inputs; the basis
    starts from the uniform grid over their range, refined by QEM (``init="fit"``).
    """

    def __init__(self, bits: int, momentum: float, init: str, iters: int) -> None:
        super().__init__()
        if not 2 <= bits <= 4:
            raise CompactnnError(f"lqnets: activation bits={bits} must be 2..4 (a2..a4).")
        self.bits, self.momentum, self.init, self.iters = bits, momentum, init, iters
        self.signed, self.observing = False, False
        self.register_buffer("table", code_table(bits, False), persistent=False)
        self.register_buffer("basis", grid_basis(torch.ones(()), bits, False))  # (K,)
        self.register_buffer("offset", torch.zeros(()))
        self.sample: list[torch.Tensor] = []

    def start_observing(self) -> None:
        """Pass inputs through unchanged and keep a sample of them."""
        self.observing, self.sample = True, []

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().reshape(-1)
        gen = torch.Generator().manual_seed(len(self.sample))
        pick = torch.randperm(flat.numel(), generator=gen)[:SAMPLE_PER_BATCH]
        self.sample += [flat[pick.to(flat.device)], flat.min().reshape(1), flat.max().reshape(1)]
        return x

    def finish_observing(self) -> None:
        """Pick signed/unsigned from the sample and initialise the basis on it."""
        if not self.sample:
            raise CompactnnError("no calibration data reached an activation quantizer.")
        x = torch.cat(self.sample).cpu()
        self.observing, self.sample = False, []
        lo, hi = float(x.min()), float(x.max())
        self.signed = lo < 0
        offset = torch.tensor(min(lo, 0.0))
        basis = grid_basis(torch.tensor([max(hi - float(offset), 1e-6)]), self.bits, False)
        if self.init == "fit":
            basis, offset = self._fit(x, basis, offset)
        with torch.no_grad():
            self.basis.copy_(basis.reshape(-1))
            self.offset.fill_(float(offset))

    def _full_table(self) -> torch.Tensor:
        """``B``'s rows: the codes, with a constant column for the offset when signed."""
        if not self.signed:
            return self.table
        return torch.cat([torch.ones(self.table.shape[0], 1), self.table.cpu()], 1).to(self.table)

    def _vector(self, basis: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        v = basis.reshape(1, -1)
        return torch.cat([offset.reshape(1, 1), v], 1) if self.signed else v

    def _fit(self, x: torch.Tensor, basis: torch.Tensor, offset: torch.Tensor):
        table = self._full_table().cpu()
        vec, _ = fit_basis(x.reshape(1, -1), self._vector(basis, offset), table, self.iters)
        return (vec[0, 1:], vec[0, 0]) if self.signed else (vec[0], offset)

    def sorted_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``2^K`` float16-representable levels, sorted, and the code of each."""
        levels = fp16(self.offset + binary01_levels(self.basis))  # (2^K,)
        values, order = torch.sort(levels, stable=True)
        return values, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return self.observe(x)
        levels, order = self.sorted_levels()
        idx = nearest_sorted(x.detach().float(), levels)
        y = levels[idx].to(x.dtype)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self._qem(x.detach().float().reshape(1, -1), order[idx].reshape(1, -1))
        inside = ((x >= levels[0]) & (x <= levels[-1])).to(x.dtype)
        return x * inside + (y - x * inside).detach()  # clipped straight-through gradient

    def _qem(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        new = qem_step(x, codes, self._full_table(), self._vector(self.basis, self.offset))[0]
        m = self.momentum
        if self.signed:
            self.offset.mul_(m).add_((1 - m) * new[0])
            new = new[1:]
        self.basis.mul_(m).add_((1 - m) * new)

    def export_levels(self) -> torch.Tensor:
        """The sorted float16-representable levels of the frozen input grid (the engine
        calls it before :meth:`export` and installs them with ``ActQuantizer.set_levels``)."""
        self.levels_exported = True
        return self.sorted_levels()[0]

    def export(self) -> tuple[QuantSpec, torch.Tensor, torch.Tensor]:
        """``(spec, scale, zero)`` of the frozen ``ActQuantizer``; its grid is
        :meth:`export_levels`, which an engine without that seam never installs: refused."""
        if not getattr(self, "levels_exported", False):
            raise CompactnnError(
                "lqnets: this compactnn's training engine cannot freeze non-uniform activation "
                "grids (engines/qat.py freeze_layer lacks export_levels); use weight-only "
                "LQ-Nets (w2-lqnets) or a uniform activation method (w2a2-lsq)."
            )
        self.levels_exported = False
        spec = QuantSpec(bits=self.bits, symmetric=False, granularity="tensor", signed=self.signed)
        levels = self.export_levels()
        scale = fp16((levels[-1] - levels[0]).clamp(min=2.0**-14) / (2**self.bits - 1))
        return spec, scale.reshape(()), torch.zeros(())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, momentum={self.momentum}"


@dataclass(frozen=True)
class LQNetsConfig(QATConfig):
    """LQ-Nets: learned binary-basis quantizers for weights (per output channel, ``K_w``
    bits) and activations (per layer, ``K_a`` bits), bases updated by QEM.

    Defaults (recipe ``w2a2-lqnets``): LSQ's schedule (4 epochs, lr 1e-3, distillation 0.5 at
    T=4); first and last layers at 8 bits (LSQ quantizers there).

    Args:
        momentum: QEM moving-average factor ``m`` in ``v <- m v + (1 - m) v*`` (0.9).
        init: ``"fit"`` (uniform grid refined by QEM on the float weights and calibration
            inputs) or ``"grid"`` (the uniform grid over the data's range).
        init_iters: encode/QEM iterations of ``init="fit"``.
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(2))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(2))
    epochs: int = 4
    distill: float = 0.5
    momentum: float = 0.9
    init: str = "fit"
    init_iters: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.weight.bits <= 4:
            raise CompactnnError(
                f"lqnets: weight.bits={self.weight.bits} is the basis size K, 1..4 "
                "(w1a2-lqnets .. w4a4-lqnets)."
            )
        if self.act is not None and not 2 <= self.act.bits <= 4:
            raise CompactnnError(
                f"lqnets: act.bits={self.act.bits} must be 2..4 (a2..a4), or no activation "
                "quantization (w2-lqnets)."
            )
        if not 0.0 <= self.momentum < 1.0:
            raise CompactnnError(f"lqnets: momentum={self.momentum} must lie in [0, 1).")
        if self.init not in INITS:
            raise CompactnnError(f"lqnets: init={self.init!r} must be one of {INITS}.")
        if not isinstance(self.init_iters, int) or self.init_iters < 0:
            raise CompactnnError(f"lqnets: init_iters={self.init_iters!r} must be >= 0.")


def lqnets_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: LQNetsConfig):
    """Engine hook: a QEM-learned ``{-1, +1}`` basis per row of the weight."""
    return LQWeight(layer.weight, spec, config.momentum, config.init, config.init_iters)


def lqnets_act_quantizer(layer: nn.Module, spec: QuantSpec, config: LQNetsConfig):
    """Engine hook: a QEM-learned ``{0, 1}`` basis for the layer's input."""
    return LQAct(spec.bits, config.momentum, config.init, config.init_iters)


register("lqnets", LQNetsConfig, "LQ-Nets: learned binary-basis quantizers, QEM-updated")(
    QATMethod(lqnets_weight_quantizer, lqnets_act_quantizer)
)
