"""Cross-layer equalization (Nagel et al. 2019): balance weight ranges of consecutive layers.

For ``A -> f -> B`` where ``f`` is positively homogeneous per channel (ReLU, LeakyReLU,
max/avg pooling, identity, flatten of a 1x1 map), ``f(x / s) = f(x) / s`` for ``s > 0``, so
dividing output channel ``i`` of ``A`` (weight row and bias) by ``s_i`` and multiplying input
channel ``i`` of ``B`` by ``s_i`` leaves the float network's function unchanged. With
``s_i = sqrt(r_A[i] / r_B[i])`` (``r`` the per-channel absolute maxima) both ranges become
``sqrt(r_A r_B)``, which per-tensor and per-channel grids quantize with less error. This
step changes float weights only; put it before a quantization step in a recipe.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.core.fold import fold_batchnorm
from compactnn.errors import CompactnnError
from compactnn.registry import register

HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
)
HOMOGENEOUS_FUNCTIONS = {
    torch.relu,
    nn.functional.relu,
    nn.functional.max_pool2d,
    nn.functional.avg_pool2d,
    nn.functional.adaptive_avg_pool2d,
    torch.flatten,
}
HOMOGENEOUS_METHODS = {"relu", "flatten"}
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclasses.dataclass(frozen=True)
class CLEConfig(MethodConfig):
    """Cross-layer equalization of ``layer -> activation -> layer`` pairs.

    Args:
        iterations: passes over all pairs (chains of three or more layers converge over
            several passes); default 20.
        fold_bn: fold ``conv -> batchnorm`` pairs first (equalization needs the folded
            weights); default True.
    """

    iterations: int = 20
    fold_bn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 1:
            raise CompactnnError(f"CLEConfig.iterations={self.iterations} must be at least 1.")


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in HOMOGENEOUS_METHODS


def find_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(A, B)`` layer name pairs joined only by per-channel homogeneous operations.

    Each node on the path has a single user, so scaling ``A``'s outputs reaches ``B`` alone.
    Returns no pairs when the model does not trace with ``torch.fx``.
    """
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), LAYERS):
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.op == "call_module" and isinstance(modules.get(nxt.target), LAYERS):
                if _compatible(modules[node.target], modules[nxt.target]):
                    pairs.append((node.target, nxt.target))
                break
            if not _is_passthrough(nxt, modules) or nxt.args[0] is not cur:
                break
            cur = nxt
    return pairs


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _compatible(a: nn.Module, b: nn.Module) -> bool:
    n = _out_channels(a)
    if isinstance(b, nn.Linear):
        return b.in_features == n
    depthwise = b.groups == n and b.out_channels == n
    return b.in_channels == n and (b.groups == 1 or depthwise)


def _input_view(b: nn.Module) -> torch.Tensor:
    """``B``'s weight viewed with input channels on dim 1 (depthwise: ``(1, C, ...)``)."""
    w = b.weight
    if isinstance(b, nn.Linear) or b.groups == 1:
        return w
    return w.transpose(0, 1)  # depthwise: output channel i reads input channel i


def equalize_pair(a: nn.Module, b: nn.Module) -> torch.Tensor:
    """Rescale one pair in place; return the per-channel scales ``(C,)``."""
    with torch.no_grad():
        wa = a.weight.reshape(a.weight.shape[0], -1)  # (C, ...)
        wb = _input_view(b)
        r_a = wa.abs().amax(1)
        r_b = wb.transpose(0, 1).reshape(wb.shape[1], -1).abs().amax(1)
        s = torch.where((r_a > 0) & (r_b > 0), torch.sqrt(r_a / r_b.clamp(min=1e-30)), 1.0)
        a.weight.div_(s.reshape((-1,) + (1,) * (a.weight.dim() - 1)))
        if a.bias is not None:
            a.bias.div_(s)
        shape = [1] * wb.dim()
        shape[1] = -1
        wb.mul_(s.reshape(shape))  # a view of b.weight: scales B in place
    return s


@register("cle", CLEConfig, "cross-layer equalization of consecutive layers (float, lossless)")
def apply_cle(
    model: nn.Module, targets: dict[str, nn.Module], config: CLEConfig, ctx: CompressContext
) -> nn.Module:
    """Equalize every targeted ``A -> activation -> B`` pair of float layers in place."""
    if config.fold_bn and not ctx.extra.get("bn_folded"):
        ctx.folded_bn.extend(fold_batchnorm(model))
        ctx.extra["bn_folded"] = True
    try:
        pairs = find_pairs(model)
    except Exception as exc:  # any tracing failure: nothing to equalize, say so
        ctx.notes.append(f"cle: the model does not trace with torch.fx ({exc}); unchanged.")
        return model
    pairs = [(a, b) for a, b in pairs if a in targets and b in targets]
    pairs = [(a, b) for a, b in pairs if type(targets[a]) in LAYERS and type(targets[b]) in LAYERS]
    for _ in range(config.iterations):
        for a, b in pairs:
            equalize_pair(model.get_submodule(a), model.get_submodule(b))
    ctx.notes.append(f"cle: equalized {len(pairs)} layer pair(s): {pairs}")
    return model
