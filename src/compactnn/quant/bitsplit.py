"""BitSplit (Wang et al., ICML 2020): optimise signed bit planes of the weights, then stitch.

A symmetric ``M``-bit code is written as a sum of ``M - 1`` signed bit planes,
``q = sum_m 2**m * b_m`` with ``b_m`` in {-1, 0, +1}; every such sum lies in
``[-(2**(M-1) - 1), 2**(M-1) - 1]``, so the stitched codes are always on the grid. Per output
channel, with ``w_hat = alpha * q``, the layer's output error on the calibration data is

    || X_f w - X_q w_hat ||^2 = alpha^2 q^T G q - 2 alpha q^T c + const,

with ``G = X_q^T X_q`` and ``c = X_q^T X_f w`` (``X`` the layer's input, unfolded for convs;
``_f`` from the float model, ``_q`` from the partly quantized one). Each plane is optimised
element by element (exact coordinate descent over {-1, 0, 1}, all channels at once), then
``alpha`` gets its least-squares value, for a few sweeps.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from compactnn.core.capture import run_until_stopped, stop_after
from compactnn.core.context import CompressContext
from compactnn.core.quantize import round_scale
from compactnn.engines.layerwise import quantize_all_rtn
from compactnn.engines.reconstruct import NotReconstructable
from compactnn.errors import CompactnnError
from compactnn.quant.base import QuantConfig, calibrate_activations
from compactnn.registry import register


@dataclasses.dataclass(frozen=True)
class BitSplitConfig(QuantConfig):
    """BitSplit: bit-plane optimisation of symmetric per-channel weights.

    Defaults (short name ``w4a8-bitsplit``): symmetric per-channel weights started from an
    MSE-searched grid, ``sweeps=3`` passes over all planes, 1,024 calibration samples
    recommended. Activations are calibrated after the weights (min-max by default).

    Args:
        sweeps: coordinate-descent passes over every bit plane and the scale.
        num_samples: calibration samples recommended (fewer gives a warning).
    """

    needs_calibration: ClassVar[bool] = True

    sweeps: int = 3
    num_samples: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.weight.symmetric or self.weight.granularity != "channel":
            raise CompactnnError(
                "BitSplit needs symmetric per-channel weights: set weight.symmetric=true and "
                "weight.granularity='channel'."
            )
        if self.weight.bits < 2 or self.sweeps < 1:
            raise CompactnnError("BitSplit needs weight.bits >= 2 and sweeps >= 1.")

    @classmethod
    def from_short(cls, wbits, abits, group, range_method: str = "minmax", **kwargs):
        """Short names give symmetric per-channel weights with an MSE-searched start."""
        if group:
            raise CompactnnError("BitSplit quantizes per channel: drop -g<G> from the name.")
        base = QuantConfig.from_short(wbits, abits, None, range_method=range_method)
        weight = dataclasses.replace(base.weight, symmetric=True, range_method="mse")
        return cls(weight=weight, act=base.act, **kwargs)


def unfold_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of the layer's input that meet one weight row: ``(samples, K)``."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(-2)
    if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise NotReconstructable("grouped convs and non-zero or 'same' padding are not handled")
    k = layer.kernel_size if isinstance(layer, nn.Conv2d) else (1, *layer.kernel_size)
    pad = layer.padding if isinstance(layer, nn.Conv2d) else (0, *layer.padding)
    dil = layer.dilation if isinstance(layer, nn.Conv2d) else (1, *layer.dilation)
    st = layer.stride if isinstance(layer, nn.Conv2d) else (1, *layer.stride)
    cols = nn.functional.unfold(x, k, dilation=dil, padding=pad, stride=st)  # (N, K, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def layer_statistics(
    qmodel: nn.Module, fp_model: nn.Module, name: str, ctx: CompressContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = X_q^T X_q`` and ``B = X_q^T X_f`` (both ``(K, K)``), streamed batch by batch."""
    seen: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(m, args):
            x = m.quantize_input(args[0]) if key == "q" else args[0]
            seen[key] = unfold_input(m, x.detach().float())

        return stop_after(hook)

    gram = cross = None
    handles = [
        qmodel.get_submodule(name).register_forward_pre_hook(grab("q")),
        fp_model.get_submodule(name).register_forward_pre_hook(grab("f")),
    ]
    try:
        with torch.no_grad():
            for b in ctx.batches:
                for model in (qmodel, fp_model):
                    run_until_stopped(ctx.run, model, b)
                xq, xf = seen.pop("q"), seen.pop("f")
                gram = xq.T @ xq if gram is None else gram + xq.T @ xq
                cross = xq.T @ xf if cross is None else cross + xq.T @ xf
    finally:
        for h in handles:
            h.remove()
    return gram.double(), cross.double()


def split_planes(q: torch.Tensor, planes: int) -> torch.Tensor:
    """Signed bit planes ``(planes, rows, K)`` of integer codes with ``|q| < 2**planes``."""
    mag, sign = q.abs().long(), torch.sign(q)
    return torch.stack([((mag >> m) & 1) * sign for m in range(planes)]).to(q.dtype)


def optimise_planes(
    q: torch.Tensor,
    alpha: torch.Tensor,
    gram: torch.Tensor,
    c: torch.Tensor,
    bits: int,
    sweeps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate descent on the bit planes of ``q`` ``(rows, K)`` and the scale ``(rows,)``.

    Minimises ``alpha^2 q G q^T - 2 alpha q . c`` per row; returns the stitched codes and the
    scale.
    """
    planes = split_planes(q, bits - 1)  # (M-1, rows, K)
    qg = q @ gram  # (rows, K), kept in sync with q
    diag = gram.diagonal()
    cand = torch.tensor([-1.0, 0.0, 1.0], dtype=q.dtype)
    for _ in range(sweeps):
        for m in reversed(range(bits - 1)):  # most significant plane first
            for k in range(q.shape[1]):
                d = (cand[None, :] - planes[m, :, k : k + 1]) * 2**m  # (rows, 3) code changes
                a = alpha[:, None]
                gain = (
                    a * a * (2 * d * qg[:, k : k + 1] + d * d * diag[k])
                    - 2 * a * d * c[:, k : k + 1]
                )
                best = gain.argmin(dim=1)
                step = d.gather(1, best[:, None]).squeeze(1)  # (rows,)
                planes[m, :, k] = cand[best]
                q[:, k] += step
                qg += step[:, None] * gram[k][None, :]
        den = (qg * q).sum(1)
        alpha = torch.where(den > 0, (q * c).sum(1) / den.clamp(min=1e-30), alpha).clamp(min=1e-12)
    return q, alpha


def bitsplit_layer(
    qmodel: nn.Module, fp_model: nn.Module, name: str, sweeps: int, ctx: CompressContext
) -> None:
    """Optimise and install the codes and per-channel scales of one layer."""
    layer = qmodel.get_submodule(name)
    bits = layer.weight_spec.bits
    gram, cross = layer_statistics(qmodel, fp_model, name, ctx)
    w = fp_model.get_submodule(name).weight.detach().double().reshape(layer.weight.shape[0], -1)
    c = w @ cross.T  # (rows, K): row r is B w_r
    limit = 2 ** (bits - 1) - 1
    q = layer.weight_codes.double().reshape(w.shape).clamp(-limit, limit)
    alpha = layer.weight_scale.double().reshape(-1)
    q, alpha = optimise_planes(q, alpha, gram, c, bits, sweeps)
    scale = round_scale(alpha.float())
    layer.set_quantized_weight(q.round(), scale.reshape(-1, 1), torch.zeros_like(scale)[:, None])


@register("bitsplit", BitSplitConfig, "BitSplit: optimise signed bit planes, then stitch")
def apply_bitsplit(
    model: nn.Module, targets: dict[str, nn.Module], config: BitSplitConfig, ctx: CompressContext
) -> nn.Module:
    """Quantize ``targets`` with bit-split weights, layer by layer in execution order."""
    ctx.require_calibration("bitsplit", config.num_samples)
    # Weights first with activations passing through (their quantizers stay uncalibrated),
    # then activation ranges on the final weights.
    fp_model, names = quantize_all_rtn(model, targets, config, ctx, calibrate=False)
    bar = ctx.bar(names, desc="bitsplit: optimising layers")
    for name in bar:
        bar.set_postfix_str(name)
        try:
            bitsplit_layer(model, fp_model, name, config.sweeps, ctx)
        except NotReconstructable as exc:
            ctx.notes.append(f"bitsplit: {name} keeps round-to-nearest weights ({exc}).")
    calibrate_activations(model, ctx)
    return model
