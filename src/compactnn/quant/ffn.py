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

optionally with the codes refit too (exact coordinate descent on the same error,
:func:`refit_codes`). Layers are fit in execution order on the inputs ``X_q`` the
already-factorized layers produce, to the float model's outputs ``X_f W^T`` (GPTQ-style error
propagation, :func:`propagated_target`). An optional fine-tuning step distils ``d`` and the
biases against the float model on the calibration data, codes fixed (:func:`distill_factors`).

*Ranks* from a size budget: per layer, the largest ``r`` whose stored bytes (two 2-bit code
matrices, ``r`` float16 ``d``, ``out`` float16 unit scales) fit what ``w<budget>`` round-to-
nearest stores for that layer (codes plus a float16 scale and a zero point per channel); or
(the default) the sum of those bytes as one whole-model budget, spent greedily where the
float model's relative output error falls most per byte (:func:`allocate_ranks`).

The layer becomes ``nn.Sequential(V-layer, U-layer)``: ``V`` as a conv of the original
geometry with ``r`` output channels and per-channel scale ``d`` (a standard ternary layer:
symmetric 2-bit codes), ``U`` as a 1x1 conv (or Linear) with unit scales and the bias. Both
are standard quantized layers (2-bit packed codes, float16 scales); the artifact records the
ranks and a load hook rebuilds the two-layer structure. With activations quantized
(``w2a8-ffn``) both factors take an input grid and deploy as two int8 convolutions.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from compactnn.core.capture import capture_batches
from compactnn.core.context import CompressContext
from compactnn.core.hessian import layer_inputs_2d
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
from compactnn.quant.ffn_factor import (
    allocate_ranks,
    joint_scales,
    propagated_target,
    rank_for_budget,
    refit_codes,
    rtn_bytes,
    stored_bytes,
    ternary_factorize,
    truncation_errors,
)
from compactnn.registry import register, register_artifact_hook

EXTRA_KEY = "ffn_ranks"  # header extra: layer name -> rank of its factorization
TERNARY = QuantSpec(bits=2, symmetric=True, granularity="channel")


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


def layer_inputs(model: nn.Module, layer: nn.Module, ctx: CompressContext) -> list[torch.Tensor]:
    """``layer``'s inputs on each calibration batch, unfolded: ``(tokens, K)`` per batch."""
    seen: list[torch.Tensor] = []
    capture_batches(model, layer, ctx, lambda _m, args: seen.append(args[0].detach().float()))
    return [layer_inputs_2d(layer, x) for x in seen]


def input_statistics(
    model: nn.Module, layer: nn.Module, float_model: nn.Module | None, name: str, ctx
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(H_qq, H_qf) / N`` of the layer's inputs in ``model`` (``X_q``) and in the float
    ``float_model`` (``X_f``, same batches); ``H_qf`` is None without ``float_model``."""
    xq = layer_inputs(model, layer, ctx)
    n = max(sum(x.shape[0] for x in xq), 1)
    h_qq = sum(x.double().T @ x.double() for x in xq) / n
    if float_model is None:
        return h_qq, None
    xf = layer_inputs(float_model, float_model.get_submodule(name), ctx)
    h_qf = sum(a.double().T @ b.double() for a, b in zip(xq, xf, strict=True)) / n
    return h_qq, h_qf


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
    sweeps: int = 0,
    target: torch.Tensor | None = None,
) -> tuple[nn.Sequential, list[float]]:
    """The quantized ``Sequential(V-layer, U-layer)`` of ``layer`` and its error history.

    The factorization fits ``target`` (default: the weight) in the weight metric; with ``h``
    ``d`` is refit to the outputs, and with ``sweeps`` the codes too (:func:`refit_codes`).
    With ``aspec`` both factors quantize their inputs (grids calibrated afterwards).
    """
    w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
    w = w if target is None else target
    u, v, d, history = ternary_factorize(w, rank, iters)
    if h is not None:
        d = joint_scales(w, u, v, h)
        if sweeps:
            u, v, d, _ = refit_codes(w, u, v, d, h, sweeps)
    u, d = u * torch.sign(d).where(d != 0, torch.ones_like(d)), d.abs()  # scales >= 0
    d = fp16(d.clamp(min=2.0**-14))
    first, second = factor_layers(layer, rank)
    with torch.no_grad():
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach().float())
    qv = ternary_layer(first, v.T.to(torch.int8), d.reshape(-1, 1), aspec)
    qu = ternary_layer(second, u.to(torch.int8), torch.ones(u.shape[0], 1), aspec)
    return nn.Sequential(qv, qu), history


def distill_factors(
    model: nn.Module, teacher: nn.Module, seqs: list[nn.Sequential], ctx, steps: int, lr: float
) -> list[float]:
    """Label-free fine-tuning: ``d`` and the biases of the factorized layers (codes fixed)
    minimise the mean squared difference of the model's outputs from the float
    ``teacher``'s on the calibration batches (Adam, ``steps`` steps); returns the losses."""
    gains = [torch.ones(seq[0].weight_scale.shape[0], requires_grad=True) for seq in seqs]

    def scale_by(g: torch.Tensor):  # the V-layer's output channels times g: d -> d g
        return lambda _m, _a, out: out * (g.view(-1, 1, 1) if out.dim() == 4 else g)

    hooks = [seq[0].register_forward_hook(scale_by(g)) for seq, g in zip(seqs, gains, strict=True)]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    biases = [seq[1].bias for seq in seqs if seq[1].bias is not None]
    for b in biases:
        b.requires_grad_(True)
    with torch.no_grad():
        targets = [ctx.run(teacher, b) for b in ctx.batches]
    params = [*gains, *biases]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    losses = []
    try:
        for step in ctx.bar(range(steps), desc="distilling factors"):
            i = step % len(ctx.batches)
            loss = nn.functional.mse_loss(ctx.run(model, ctx.batches[i]), targets[i])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():  # Adam (b1 0.9, b2 0.999), bias-corrected
                for p, grad, (m1, m2) in zip(params, grads, moments, strict=True):
                    m1.mul_(0.9).add_(grad, alpha=0.1)
                    m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
                    m1_hat, m2_hat = m1 / (1 - 0.9 ** (step + 1)), m2 / (1 - 0.999 ** (step + 1))
                    p.sub_(lr * m1_hat / (m2_hat.sqrt() + 1e-8))
            losses.append(loss.item())
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    with torch.no_grad():  # fold the gains into the stored scales (signs into V's codes)
        for seq, g in zip(seqs, gains, strict=True):
            s = seq[0].weight_scale.reshape(-1) * g
            codes = seq[0].weight_codes.reshape(s.shape[0], -1) * torch.sign(s).unsqueeze(1)
            scale = fp16(s.abs().clamp(min=2.0**-14)).reshape(-1, 1)
            seq[0].set_quantized_weight(codes.to(torch.int8), scale, torch.zeros_like(scale))
    return losses


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
        sweeps: with ``refit``, coordinate-descent sweeps refitting the ternary codes (and
            ``d``) to the layer's outputs (0: ``d`` only).
        propagate: with ``refit``, fit each layer on the inputs the already-factorized
            layers produce, to the float model's outputs (GPTQ-style error propagation).
        allocation: ``"model"``: ranks from one whole-model byte budget (the sum of the
            factorized layers' ``w<budget>`` bytes), greedily where the relative output
            error falls most per byte (:func:`allocate_ranks`); ``"layer"``: each layer
            fits its own ``w<budget>`` bytes (:func:`rank_for_budget`).
        distill_steps: after the post-training fit, Adam steps of label-free distillation
            of ``d`` and the factorized layers' biases against the float model on the
            calibration data (codes fixed; 0: none, the pure post-training method).
        distill_lr: its learning rate.
    """

    weight: QuantSpec = dataclasses.field(default_factory=lambda: TERNARY)
    budget: float = 2.0
    iters: int = 10
    refit: bool = True
    sweeps: int = 0
    propagate: bool = True
    allocation: str = "model"
    distill_steps: int = 0
    distill_lr: float = 1e-3

    def uses_data(self) -> bool:
        """The refit and the distillation read the calibration batches (optional: without
        data the factorization is fit to the weights alone)."""
        return super().uses_data() or self.refit or self.distill_steps > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight.bits != 2:
            raise CompactnnError(
                f"ffn: factors are ternary (2-bit); weight.bits={self.weight.bits}."
            )
        if not 0.5 <= self.budget <= 8.0:
            raise CompactnnError(f"ffn: budget={self.budget} bits per weight must lie in [0.5, 8].")
        for field in ("iters", "sweeps", "distill_steps"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CompactnnError(f"ffn: {field}={value!r} must be a non-negative integer.")
        if not self.distill_lr > 0:
            raise CompactnnError(f"ffn: distill_lr={self.distill_lr} must be positive.")
        if self.allocation not in ("model", "layer"):
            raise CompactnnError(f"ffn: allocation={self.allocation!r} must be 'model' or 'layer'.")

    @classmethod
    def from_short(cls, wbits, abits, group, range_method="minmax", **kwargs):
        """``w<B>[a<A>]-ffn``: the rank budget of ``w<B>``, activations at ``A`` bits."""
        if group is not None:
            raise CompactnnError("ffn ranks are per layer, not per group: use w2-ffn or w2a8-ffn.")
        act = short_act_spec(abits, range_method) if abits is not None else None
        return cls(budget=float(wbits), act=act, **kwargs)


def plan_ranks(
    model: nn.Module, layers: dict[str, nn.Module], config: FFNConfig, ctx: CompressContext | None
) -> dict[str, int]:
    """Each layer's rank: its own ``w<budget>`` bytes, or one whole-model budget allocated
    on the float model's output errors (calibration inputs of ``ctx``; weights without)."""
    shapes = {n: (m.weight.shape[0], m.weight[0].numel()) for n, m in layers.items()}
    own = {n: rank_for_budget(o, k, config.budget) for n, (o, k) in shapes.items()}
    if config.allocation == "layer" or len(layers) < 2:
        return own
    errors, costs = {}, {}
    for n, m in layers.items():
        o, k = shapes[n]
        h = input_statistics(model, m, None, n, ctx)[0] if ctx is not None else None
        w = m.weight.detach().float().reshape(o, -1)
        top = min(2 * own[n], 2 * min(o, k))
        errors[n] = truncation_errors(w, top, min(config.iters, 3), h)
        costs[n] = [stored_bytes(o, k, r) for r in range(1, top + 1)]
    budget = sum(rtn_bytes(o, k, config.budget) for o, k in shapes.values())
    return allocate_ranks(errors, costs, budget)


@register("ffn", FFNConfig, "FFN: ternary factorization U diag(d) V^T, label-free refit")
def apply_ffn(
    model: nn.Module, targets: dict[str, nn.Module], config: FFNConfig, ctx: CompressContext
) -> nn.Module:
    """Factorize each targeted Linear / Conv2d; first and last layers: 8-bit RTN."""
    prepare_model(model, config, ctx)
    layers = split_supported(targets, ctx)
    specs = layer_specs(model, layers, config, ctx)
    ranks: dict[str, int] = dict(ctx.extra.get(EXTRA_KEY, {}))
    refit = config.refit and bool(ctx.batches)
    chosen = {
        n: layers[n]
        for n, (wspec, _) in specs.items()
        if wspec.bits == config.weight.bits and factorizable(layers[n])
    }
    planned = plan_ranks(model, chosen, config, ctx if refit else None)
    distill = config.distill_steps > 0 and bool(ctx.batches)
    keep_float = (refit and config.propagate) or distill
    float_model = copy.deepcopy(model) if keep_float else None
    seqs = []
    for name in ctx.bar(list(specs), desc="factorizing layers"):
        wspec, aspec = specs[name]
        layer = layers[name]
        if name not in chosen:
            set_module(model, name, quantize_layer_rtn(layer, wspec, aspec))
            continue
        w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
        h, target = None, None
        if refit:
            teacher = float_model if config.propagate else None
            h, h_qf = input_statistics(model, layer, teacher, name, ctx)
            target = propagated_target(w, h, h_qf) if config.propagate else None
        rank = planned[name]
        seq, _ = factorize_layer(layer, rank, config.iters, h, aspec, config.sweeps, target)
        set_module(model, name, seq)
        ranks[name] = rank
        seqs.append(seq)
    if distill and seqs:
        distill_factors(model, float_model, seqs, ctx, config.distill_steps, config.distill_lr)
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
