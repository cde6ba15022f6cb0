"""FFN: fixed-point factorized networks (Wang & Cheng, CVPR 2017; unsupervised refit after
the TNNLS 2020 version): a weight as a product of two ternary matrices and a diagonal.

A layer's weight ``W`` ``(out, K)`` (a conv's ``(out, in*kh*kw)``) is approximated as::

    W ~ U diag(d) V^T,    U in {-1, 0, 1}^(out x r),  V in {-1, 0, 1}^(K x r),  d in R^r

*Alternating ternary factorization.* Rank-one terms are fit greedily to the residual and
then back-fitted: for term ``k`` with partial residual ``R = W - sum_{j != k} d_j u_j v_j^T``
the best scale is ``d = u^T R v / (|u|_0 |v|_0)`` and the error ``||R||^2 - (u^T R v)^2 /
(|u|_0 |v|_0)``; for fixed ``v`` the best ternary ``u`` keeps the ``t`` largest ``|R v|``
(with their signs) for the ``t`` that maximises ``(sum of those)^2 / t``, and symmetrically
for ``v``. Every step minimises the error exactly over its block, so the reconstruction
error never increases. A final joint least-squares step refits all of ``d``.

*Label-free refit* on calibration data: with ``H = X^T X`` of the layer's inputs (a conv's
unfolded patches), ``d`` minimises ``||X (W - U diag(d) V^T)^T||^2``, the layer's output error::

    G d = b,   G_kl = (u_k^T u_l)(v_k^T H v_l),   b_k = u_k^T W H v_k

*Rank* per layer from a size budget: the largest ``r`` whose stored bytes (two 2-bit code
matrices, ``r`` float16 ``d``, ``out`` float16 unit scales) fit what ``w<budget>`` round-to-
nearest stores for that layer (codes plus a float16 scale and a zero point per channel).

The layer becomes ``nn.Sequential(V-layer, U-layer)``: ``V`` as a conv of the original
geometry with ``r`` output channels and per-channel scale ``d`` (a standard ternary layer:
symmetric 2-bit codes), ``U`` as a 1x1 conv (or Linear) with unit scales and the bias. Both
are standard quantized layers (2-bit packed codes, float16 scales); the artifact records the
ranks and a load hook rebuilds the two-layer structure. With activations quantized
(``w2a8-ffn``) both factors take an input grid and deploy as two int8 convolutions.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from compactnn.core.capture import capture_batches
from compactnn.core.context import CompressContext
from compactnn.core.hessian import accumulate_hessian, layer_inputs_2d
from compactnn.core.modules import set_module
from compactnn.core.qlayers import make_quant_layer, quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.engines.qat_quantizers import fp16
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.quant.base import (
    QuantConfig,
    calibrate_activations,
    layer_specs,
    prepare_model,
    short_act_spec,
    split_supported,
)
from compactnn.registry import register, register_artifact_hook

EXTRA_KEY = "ffn_ranks"  # header extra: layer name -> rank of its factorization
TERNARY = QuantSpec(bits=2, symmetric=True, granularity="channel")


def best_ternary(z: torch.Tensor) -> torch.Tensor:
    """The ternary ``t`` maximising ``(t^T z)^2 / |t|_0``: signs of the top ``k`` of ``|z|``.

    Example:
        >>> best_ternary(torch.tensor([3.0, -0.1, -2.0])).tolist()
        [1.0, 0.0, -1.0]
    """
    mag, order = z.abs().sort(descending=True)
    k = torch.arange(1, z.numel() + 1, dtype=z.dtype)
    k_best = int((mag.cumsum(0).pow(2) / k).argmax()) + 1
    t = torch.zeros_like(z)
    keep = order[:k_best]
    t[keep] = torch.sign(z[keep])
    return t


def rank_one_scale(r: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``d = u^T R v / (|u|_0 |v|_0)`` (0 when either factor is empty)."""
    n = (u != 0).sum() * (v != 0).sum()
    return (u @ r @ v) / n if n > 0 else r.new_zeros(())


def fit_rank_one(r: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sweeps: int = 3):
    """Alternate the exact ternary ``u`` and ``v`` steps on residual ``r``; returns
    ``(u, v, d)``. Starts from ``(u, v)`` and never lowers ``(u^T r v)^2 / (|u|_0 |v|_0)``."""
    for _ in range(sweeps):
        u = best_ternary(r @ v) if (v != 0).any() else u
        v = best_ternary(r.T @ u) if (u != 0).any() else v
    return u, v, rank_one_scale(r, u, v)


def joint_scales(
    w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, h: torch.Tensor | None = None
) -> torch.Tensor:
    """All of ``d`` by least squares: ``(U^T U * V^T H V) d = diag(U^T W H V)`` (``H = I``:
    the weight reconstruction; ``H = X^T X``: the layer's outputs on calibration data)."""
    u64, v64, w64 = u.double(), v.double(), w.double()
    hv = v64 if h is None else h.double() @ v64  # (K, r)
    gram = (u64.T @ u64) * (v64.T @ hv)
    rhs = ((u64.T @ w64) * hv.T).sum(1)
    ridge = 1e-9 * gram.diagonal().mean().clamp(min=1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.lstsq(gram + ridge * eye, rhs.unsqueeze(1)).solution.squeeze(1).float()


def factor_error(w, u, v, d) -> float:
    return float((w - (u * d) @ v.T).pow(2).sum())


def ternary_factorize(
    w: torch.Tensor, rank: int, iters: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """``W ~ U diag(d) V^T`` with ternary ``U`` ``(out, r)``, ``V`` ``(K, r)``.

    Returns ``(U, V, d, history)``: ``history`` holds the squared reconstruction error after
    the greedy pass and after each back-fitting sweep (non-increasing), then after the joint
    least-squares refit of ``d``.
    """
    w = w.detach().float()
    out, k = w.shape
    u, v, d = w.new_zeros(out, rank), w.new_zeros(k, rank), w.new_zeros(rank)
    resid = w.clone()
    for j in range(rank):  # greedy: start each term from the residual's top singular pair
        _, _, vh = torch.linalg.svd(resid, full_matrices=False)
        v0 = best_ternary(vh[0])
        u[:, j], v[:, j], d[j] = fit_rank_one(resid, best_ternary(resid @ v0), v0)
        resid -= d[j] * torch.outer(u[:, j], v[:, j])
    history = [factor_error(w, u, v, d)]
    for _ in range(iters):  # back-fitting sweeps
        for j in range(rank):
            partial = resid + d[j] * torch.outer(u[:, j], v[:, j])
            u[:, j], v[:, j], d[j] = fit_rank_one(partial, u[:, j], v[:, j], sweeps=1)
            resid = partial - d[j] * torch.outer(u[:, j], v[:, j])
        history.append(factor_error(w, u, v, d))
        if history[-2] - history[-1] <= 1e-7 * history[0]:
            break
    d = joint_scales(w, u, v)
    history.append(factor_error(w, u, v, d))
    return u, v, d, history


def stored_bytes(out: int, k: int, rank: int) -> int:
    """Bytes the two ternary layers store: 2-bit codes, float16 ``d`` and unit scales."""
    return math.ceil(2 * rank * k / 8) + math.ceil(2 * out * rank / 8) + 2 * rank + 2 * out


def rank_for_budget(out: int, k: int, bits: float) -> int:
    """The largest rank whose stored bytes fit ``w<bits>`` round-to-nearest's (>= 1)."""
    target = math.ceil(bits * out * k / 8) + 3 * out  # codes + fp16 scale + zero per channel
    rank = 1
    while rank < 2 * min(out, k) and stored_bytes(out, k, rank + 1) <= target:
        rank += 1
    return rank


def factor_layers(layer: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """Float ``(V-layer, U-layer)`` whose composition has ``layer``'s geometry and bias."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, rank, bias=False), nn.Linear(
            rank, layer.out_features, bias
        )
    first = nn.Conv2d(
        layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, bias=False, padding_mode=layer.padding_mode,
    )  # fmt: skip
    return first, nn.Conv2d(rank, layer.out_channels, 1, bias=bias)


def factorizable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


def input_hessian(model: nn.Module, layer: nn.Module, ctx: CompressContext) -> torch.Tensor:
    """``X^T X / N`` of ``layer``'s inputs on the calibration batches, ``(K, K)``."""
    acc: list = [None, 0]

    def hook(_m, args):
        x2d = layer_inputs_2d(layer, args[0].detach().float())
        acc[0] = accumulate_hessian(acc[0], x2d, torch.float64)
        acc[1] += x2d.shape[0]

    capture_batches(model, layer, ctx, hook)
    return acc[0] / max(acc[1], 1)


def ternary_layer(float_layer, codes: torch.Tensor, scale: torch.Tensor, aspec=None):
    q = make_quant_layer(float_layer, TERNARY, aspec)
    q.set_quantized_weight(codes.reshape(q.weight.shape), scale, torch.zeros_like(scale))
    return q


def factorize_layer(
    layer: nn.Module,
    rank: int,
    iters: int,
    h: torch.Tensor | None,
    aspec: QuantSpec | None = None,
) -> tuple[nn.Sequential, list[float]]:
    """The quantized ``Sequential(V-layer, U-layer)`` of ``layer`` and its error history;
    with ``aspec`` both factors quantize their inputs (grids calibrated afterwards)."""
    w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
    u, v, d, history = ternary_factorize(w, rank, iters)
    if h is not None:
        d = joint_scales(w, u, v, h)
    u, d = u * torch.sign(d).where(d != 0, torch.ones_like(d)), d.abs()  # scales >= 0
    d = fp16(d.clamp(min=2.0**-14))
    first, second = factor_layers(layer, rank)
    with torch.no_grad():
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach().float())
    qv = ternary_layer(first, v.T.to(torch.int8), d.reshape(-1, 1), aspec)
    qu = ternary_layer(second, u.to(torch.int8), torch.ones(u.shape[0], 1), aspec)
    return nn.Sequential(qv, qu), history


@dataclasses.dataclass(frozen=True)
class FFNConfig(QuantConfig):
    """FFN: ternary factorization ``W ~ U diag(d) V^T`` per layer (``w2-ffn``, ``w2a8-ffn``).

    With ``act`` set, both factors quantize their inputs (the U-layer's input is the rank-r
    intermediate), so the two layers run on integer kernels.

    Args:
        budget: bits per weight whose round-to-nearest artifact bytes each layer's
            factorization may use (decides the rank; 2.0: the bytes of ``w2``).
        iters: back-fitting sweeps at most.
        refit: refit ``d`` on the calibration data (the layer's outputs; label-free);
            False: ``d`` from the weight reconstruction only.
    """

    weight: QuantSpec = dataclasses.field(default_factory=lambda: TERNARY)
    budget: float = 2.0
    iters: int = 10
    refit: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight.bits != 2:
            raise CompactnnError(
                f"ffn: factors are ternary (2-bit); weight.bits={self.weight.bits}."
            )
        if not 0.5 <= self.budget <= 8.0:
            raise CompactnnError(f"ffn: budget={self.budget} bits per weight must lie in [0.5, 8].")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise CompactnnError(f"ffn: iters={self.iters!r} must be a non-negative integer.")

    @classmethod
    def from_short(cls, wbits, abits, group, range_method="minmax", **kwargs):
        """``w<B>[a<A>]-ffn``: the rank budget of ``w<B>``, activations at ``A`` bits."""
        if group is not None:
            raise CompactnnError("ffn ranks are per layer, not per group: use w2-ffn or w2a8-ffn.")
        act = short_act_spec(abits, range_method) if abits is not None else None
        return cls(budget=float(wbits), act=act, **kwargs)


@register("ffn", FFNConfig, "FFN: ternary factorization U diag(d) V^T, label-free refit")
def apply_ffn(
    model: nn.Module, targets: dict[str, nn.Module], config: FFNConfig, ctx: CompressContext
) -> nn.Module:
    """Factorize each targeted Linear / Conv2d; first and last layers: 8-bit RTN."""
    prepare_model(model, config, ctx)
    layers = split_supported(targets, ctx)
    specs = layer_specs(model, layers, config, ctx)
    ranks: dict[str, int] = dict(ctx.extra.get(EXTRA_KEY, {}))
    for name in ctx.bar(list(specs), desc="factorizing layers"):
        wspec, aspec = specs[name]
        layer = layers[name]
        if wspec.bits != config.weight.bits or not factorizable(layer):
            set_module(model, name, quantize_layer_rtn(layer, wspec, aspec))
            continue
        w = layer.weight
        rank = rank_for_budget(w.shape[0], w[0].numel(), config.budget)
        h = input_hessian(model, layer, ctx) if config.refit and ctx.batches else None
        seq, _ = factorize_layer(layer, rank, config.iters, h, aspec)
        set_module(model, name, seq)
        ranks[name] = rank
    if config.refit and not ctx.batches:
        ctx.warn("ffn: no calibration data; d fit to the weights only (pass calib_data).")
    ctx.extra[EXTRA_KEY] = ranks
    calibrate_activations(model, ctx)
    return model


@register_artifact_hook("before_layers")
def restore_factorized(model: nn.Module, extra: dict) -> None:
    """At ``load``: each recorded layer of the skeleton becomes its two float factors."""
    ranks = extra.get(EXTRA_KEY)
    if not ranks:
        return
    if not isinstance(ranks, dict):
        raise ArtifactError(f"extra[{EXTRA_KEY!r}] must map layer names to ranks.")
    for name, rank in ranks.items():
        try:
            layer = model.get_submodule(name) if isinstance(name, str) else None
        except AttributeError:
            layer = None
        ok = isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= 1 << 16
        if layer is None or not factorizable(layer) or not ok:
            raise ArtifactError(
                f"extra[{EXTRA_KEY!r}][{name!r:.60}] names no factorizable layer of the "
                "skeleton with a valid rank: pass the float model the artifact was made from."
            )
        set_module(model, name, nn.Sequential(*factor_layers(layer, rank)))
