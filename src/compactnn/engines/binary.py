"""Binary networks in the training-aware engine: the pieces XNOR-Net, Bi-Real Net and
ReActNet share, and the block that replaces a layer with 1-bit activations.

Weights: ``w_b = alpha * sign(w)`` with ``alpha = mean|w|`` per output filter
(:class:`BinaryWeight`); frozen, 1-bit codes ``c = [w >= 0]`` with a per-filter codebook
``[-alpha, +alpha]``; ``sign(0) = +1`` throughout. The sign's gradient is straight-through
where ``|x| <= 1`` (:func:`sign_ste`, XNOR-Net) or Bi-Real's polynomial approximation
(:func:`approx_sign`). These elementwise pieces live in :mod:`compactnn.engines.binary_ops`
and are re-exported here.

A uniform activation grid cannot express ``sign`` with a learned shift, a real-valued
shortcut or RPReLU, so a layer with 1-bit activations is replaced (under its own name) by a
:class:`BinaryBlock` that holds it as ``.layer``::

    x -> shift -> sign -> layer(binary weights) [* K for XNOR] -> BN -> * gain * scale + bias
      [+ shortcut(x) for Bi-Real / ReActNet]  [-> RPReLU for ReActNet]

The batch norm (without affine parameters: ``gain``, ``scale`` and the layer's bias are its
affine part) normalises the binary layer's output with batch statistics while training, as
the batch norm after every binary conv does in all three papers. It exists only while
training: freezing folds its running statistics into ``scale`` and the bias.

Frozen, ``.layer`` is a standard ``QuantConv2d``/``QuantLinear`` with 1-bit codes; the block's
own float parameters (shift, RPReLU) are ordinary state-dict tensors. The artifact header
lists the blocks (``extra["binary_blocks"]``: name -> kind) and :func:`rebuild_blocks` (an
artifact hook) puts them back into the float skeleton before ``load`` installs the layers.

The shift before the sign is needed here because, with batch norms folded, the input of a
binary layer usually follows a ReLU: ``sign`` of a non-negative tensor carries no
information. It starts at each channel's mean input, so the sign splits the values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from compactnn import registry
from compactnn.core.context import CompressContext
from compactnn.core.modules import set_module
from compactnn.core.spec import QuantSpec
from compactnn.engines.binary_checks import check_binary_layers as check_binary_layers
from compactnn.engines.binary_ops import (  # `X as X`: re-exported public names
    ApproxSign as ApproxSign,
)
from compactnn.engines.binary_ops import (
    RPReLU,
    approx_sign,
    sign_ste,
    xnor_scale,
)
from compactnn.engines.binary_ops import SignSTE as SignSTE
from compactnn.engines.binary_ops import approx_sign_grad as approx_sign_grad
from compactnn.engines.binary_ops import binary_weight as binary_weight
from compactnn.engines.binary_ops import rprelu as rprelu
from compactnn.engines.binary_ops import sign_pm1 as sign_pm1
from compactnn.engines.binary_weight import EDE_ON as EDE_ON
from compactnn.engines.binary_weight import KINDS as KINDS
from compactnn.engines.binary_weight import BinaryConfig as BinaryConfig
from compactnn.engines.binary_weight import BinaryWeight as BinaryWeight
from compactnn.engines.irnet import ede_sign
from compactnn.engines.qat import QATMethod, QATWrapper, freeze_layer
from compactnn.errors import CompactnnError

# Optional activation functions of a block (name -> factory(in_channels, conv, **options)),
# for methods whose 1-bit activations are not ``sign`` ({0, 1} activations); see
# :func:`register_block_act`.
BLOCK_ACTS: dict[str, Callable[..., nn.Module]] = {}


def register_block_act(name: str) -> Callable:
    """Decorator: ``factory(in_channels, conv, **options) -> module`` mapping the shifted
    input ``x - shift`` of a block to its binary activations. A block built with such a
    module records ``{"kind": name, **options}`` in ``extra["binary_acts"]`` so that
    :func:`rebuild_blocks` builds it again when an artifact is loaded."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BLOCK_ACTS[name] = factory
        return factory

    return deco


def check_binary_layer(name: str, layer: nn.Module) -> None:
    """Refuse a layer a binary block cannot wrap (say which and why);
    :func:`check_binary_layers` names all of a model's in one message."""
    check_binary_layers({name: layer})


def channels_of(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` channels of a Conv2d or features of a Linear layer."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


def real_shortcut(x: torch.Tensor, y: torch.Tensor, conv: bool) -> torch.Tensor:
    """``x`` brought to ``y``'s shape without parameters: average-pooled to its spatial
    size, channels repeated (more out) or averaged in groups (fewer out)."""
    if conv and x.shape[-2:] != y.shape[-2:]:
        x = F.adaptive_avg_pool2d(x, y.shape[-2:])
    dim = 1 if conv else -1
    cin, cout = x.shape[dim], y.shape[dim]
    if cout > cin:
        x = torch.repeat_interleave(x, cout // cin, dim=dim)
    elif cout < cin:
        x = x.unflatten(dim, (cout, cin // cout)).mean(dim=dim + 1 if conv else -1)
    return x


def shortcut_fits(cin: int, cout: int) -> bool:
    """Whether a parameter-free shortcut maps ``cin`` channels onto ``cout``."""
    return cout % cin == 0 if cout >= cin else cin % cout == 0


class BinaryBlock(QATWrapper):
    """A layer with binary input activations (and binary weights when trained/frozen).

    Args:
        layer: the float ``nn.Conv2d``/``nn.Linear`` (training) or its frozen twin.
        kind: ``"xnor"``, ``"bireal"`` or ``"reactnet"``.
        weight_quantizer: the binary weight quantizer while training; ``None`` once frozen
            (the layer's own ``weight`` is then the dequantized binary weight).
        act: optional module mapping ``x - shift`` to the binary activations (forward and
            gradient); None: the kind's ``sign`` (clipped STE, Bi-Real's polynomial, EDE).
    """

    def __init__(
        self,
        layer: nn.Module,
        kind: str,
        weight_quantizer: nn.Module | None = None,
        act: nn.Module | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise CompactnnError(f"unknown binary block kind {kind!r}; use one of {KINDS}.")
        self.kind = kind
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.conv = isinstance(layer, nn.Conv2d)
        cin, cout = channels_of(layer)
        shift = torch.zeros(cin)
        if kind == "bireal":  # Bi-Real has no learned shift: fixed at its initial value
            self.register_buffer("shift", shift)
        else:
            self.shift = nn.Parameter(shift)
        # per-channel output gain: the batch norm a binary conv needs after it (folded away
        # here). ``scale`` (fixed) matches the float layer's statistics at initialisation;
        # the learned ``gain`` starts at 1, so Adam's steps are relative to it.
        self.register_buffer("scale", torch.ones(cout))
        self.gain = nn.Parameter(torch.ones(cout))
        self.shortcut = kind != "xnor" and shortcut_fits(cin, cout)
        self.post = RPReLU(cout, dim=1 if self.conv else -1) if kind == "reactnet" else None
        # batch norm of the binary path while training (folded away by ``fold_norm``)
        self.norm = None
        if weight_quantizer is not None:
            self.norm = nn.BatchNorm1d(cout, affine=False)
            if layer.bias is None:  # the folded batch norm needs somewhere to put its shift
                layer.bias = nn.Parameter(torch.zeros(cout, device=layer.weight.device))
        self.act = act
        self.observing = False
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._sample: torch.Tensor | None = None

    def _channel_view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.reshape(1, -1, *([1] * (ndim - 2))) if self.conv else t

    def start_observing(self) -> None:
        """Run the float layer and collect per-channel input means (calibration)."""
        self.observing, self._sum, self._count = True, None, 0

    def finish_observing(self) -> None:
        """Set the shift to the mean input and match the float layer's output statistics."""
        if self._sum is None:
            raise CompactnnError("no calibration data reached a binary block.")
        with torch.no_grad():
            self.shift.copy_(self._sum / self._count)
            self._match_float_statistics(self._sample)
        self.observing, self._sum, self._sample = False, None, None

    def _match_float_statistics(self, x: torch.Tensor) -> None:
        """Set ``scale`` and the bias so that, per output channel, the binary path has the
        mean and standard deviation of what the float layer added (minus the shortcut)."""
        target = self._op(x, self.layer.weight) + self._bias(x.dim())
        if self.shortcut:
            target = target - real_shortcut(x, target, self.conv)
        self.gain.fill_(1.0)
        self.scale.fill_(1.0)
        if self.norm is not None:  # running statistics of the raw binary output
            raw = self._raw(x)
            dims = [d for d in range(raw.dim()) if d != self._cdim(raw)]
            self.norm.running_mean.copy_(raw.mean(dim=dims))
            self.norm.running_var.copy_(raw.var(dim=dims))
        binary = self._binary_path(x)
        dims = [d for d in range(target.dim()) if d != (1 if self.conv else target.dim() - 1)]
        t_std, b_std = target.std(dim=dims), binary.std(dim=dims).clamp(min=1e-8)
        self.scale.copy_(torch.where(t_std > 0, t_std / b_std, torch.ones_like(t_std)))
        if self.layer.bias is not None:
            shift = target.mean(dim=dims) - self.scale * binary.mean(dim=dims)
            self.layer.bias.copy_(shift)

    def _observe(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(x.dim()) if d != (1 if self.conv else x.dim() - 1)]
        s = x.detach().sum(dim=dims)
        self._sum = s if self._sum is None else self._sum + s
        self._count += x.numel() // x.shape[1 if self.conv else -1]
        if self._sample is None:
            self._sample = x.detach()[:256]
        w = self.layer.weight
        return self._op(x, w) + self._bias(x.dim())

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.layer._conv_forward(x, w, None) if self.conv else F.linear(x, w)

    def _bias(self, ndim: int) -> torch.Tensor | float:
        b = self.layer.bias
        return 0.0 if b is None else self._channel_view(b, ndim)

    def _cdim(self, t: torch.Tensor) -> int:
        return 1 if self.conv else t.dim() - 1

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """``layer(sign(x - shift))`` with binary weights (times ``K`` for XNOR)."""
        xs = x - self._channel_view(self.shift, x.dim())
        wq = self.weight_quantizer
        w = self.layer.weight if wq is None else wq(self.layer.weight)  # first: EDE's step t
        if self.act is not None:
            xb = self.act(xs)
        elif wq is not None and getattr(wq, "ede_acts", False):
            xb = ede_sign(xs, wq.t)
        else:
            xb = sign_ste(xs) if self.kind == "xnor" else approx_sign(xs)
        y = self._op(xb, w)
        if self.kind == "xnor":
            y = y * xnor_scale(xs, self.layer)
        return y

    def _normalise(self, y: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return y
        if self.conv:  # (N, C, H, W) -> (N, C, H*W) for BatchNorm1d
            return self.norm(y.flatten(2)).reshape(y.shape)
        return self.norm(y.reshape(-1, y.shape[-1])).reshape(y.shape)

    def _binary_path(self, x: torch.Tensor) -> torch.Tensor:
        """``gain * scale * BN(layer(sign(x - shift)))`` (XNOR: times ``K``), without bias."""
        y = self._normalise(self._raw(x))
        return y * self._channel_view(self.gain * self.scale, y.dim())

    def fold_norm(self) -> None:
        """Fold the batch norm's running statistics into ``scale`` and the layer's bias:
        ``(y - mu) / sigma * g + b = y * (g / sigma) + (b - mu g / sigma)``."""
        if self.norm is None:
            return
        with torch.no_grad():
            sigma = torch.sqrt(self.norm.running_var + self.norm.eps)
            g = self.gain * self.scale
            self.layer.bias.sub_(self.norm.running_mean * g / sigma)
            self.scale.div_(sigma)
        self.norm = None

    def freeze(self) -> nn.Module:
        """Fold the batch norm and freeze ``.layer`` to 1-bit codes; the block stays."""
        self.fold_norm()
        self.layer = freeze_layer(self.layer, self.weight_quantizer, None)
        self.weight_quantizer = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return self._observe(x)
        y = self._binary_path(x) + self._bias(x.dim())
        if self.shortcut:
            y = y + real_shortcut(x, y, self.conv)
        if self.post is not None:
            y = self.post(y)
        return y

    def extra_repr(self) -> str:
        return f"kind={self.kind}, shortcut={self.shortcut}"


def recalibrate_norms(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the running statistics of every binary block's batch norm on ``batches``
    (the model in eval mode otherwise): the exact average over the batches, replacing the
    exponential average collected while the binary weights were still flipping. Returns the
    number of batch norms re-estimated (0: no binary block, nothing changed).

    The frozen model normalises with the running statistics; with few training steps the
    exponential average can lag far behind the final weights (a 40-point gap between train
    and held-out top-1 measured on a narrow CNN, docs/lowbit-training.md).
    """
    norms = [m.norm for m in model.modules() if isinstance(m, BinaryBlock) and m.norm is not None]
    if not norms:
        return 0
    was = model.training
    model.eval()
    saved = [(n.momentum, n.running_mean.clone(), n.running_var.clone()) for n in norms]
    for n in norms:
        n.reset_running_stats()
        n.momentum = None  # cumulative average
        n.train()
    seen = 0
    with torch.no_grad():
        for x in batches:
            model(x)
            seen += 1
    for n, (momentum, mean, var) in zip(norms, saved, strict=True):
        n.momentum = momentum
        if seen == 0:  # nothing to estimate from: keep what was there
            n.running_mean.copy_(mean)
            n.running_var.copy_(var)
    model.train(was)
    return len(norms)


@registry.register_artifact_hook("before_layers")
def rebuild_blocks(model: nn.Module, extra: dict) -> None:
    """Wrap the float skeleton's layers named in ``extra["binary_blocks"]`` (artifact load)."""
    acts = extra.get("binary_acts", {})
    for name, kind in extra.get("binary_blocks", {}).items():
        layer = model.get_submodule(name)
        if isinstance(layer, BinaryBlock):
            continue
        act = make_block_act(dict(acts[name]), layer) if name in acts else None
        set_module(model, name, BinaryBlock(layer, kind, act=act))


def make_block_act(options: dict, layer: nn.Module) -> nn.Module:
    """The activation module ``options["kind"]`` of ``layer``'s block (see
    :func:`register_block_act`); the other entries of ``options`` go to its factory."""
    name = options.pop("kind")
    if name not in BLOCK_ACTS:
        raise CompactnnError(
            f"binary activation {name!r} is not registered: import the method that defines "
            f"it (known: {sorted(BLOCK_ACTS)})."
        )
    return BLOCK_ACTS[name](channels_of(layer)[0], isinstance(layer, nn.Conv2d), **options)


def _binary_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: BinaryConfig) -> nn.Module:
    irnet = config.libra_pb or config.ede
    wq = BinaryWeight(
        config.real_weight_epochs, config.libra_pb, config.ede, config.ede_t_min,
        t_max=config.ede_t_max, ede_on=config.ede_on, per_step=config.ede_per_step,
        wd=config.irnet_wd if irnet else 0.0,
    )  # fmt: skip
    if irnet:  # recorded by make_block in the frozen model's extra["irnet"]
        given = getattr(config, "recipe_lr", config.lr)  # the user's lr, before irnet_lr
        if config.lr != given:
            note = f"the weights trained at irnet_lr instead of the recipe's lr {given:g}"
        elif config.irnet_lr is None:
            note = "irnet_lr=None: the recipe's lr"
        else:
            note = "the recipe's lr" + (" (= irnet_lr)" if given == config.irnet_lr else "")
        wq.irnet_note = {
            "libra_pb": config.libra_pb, "ede": config.ede, "lr": config.lr,
            "recipe_lr": given, "irnet_lr": config.irnet_lr, "note": note,
        }  # fmt: skip
    return wq


def make_block(
    kind: str,
    name: str,
    layer: nn.Module,
    weight_quantizer: nn.Module,
    ctx: CompressContext,
    act_options: dict | None = None,
) -> BinaryBlock:
    """A ``kind`` block of ``layer``, recorded in ``ctx.extra`` for loading; ``act_options``
    (``{"kind": name, **options}`` of a :func:`register_block_act` activation) replaces the
    block's ``sign``."""
    check_binary_layer(name, layer)
    ctx.extra.setdefault("binary_blocks", {})[name] = kind  # read back by rebuild_blocks
    if getattr(weight_quantizer, "irnet_note", None) is not None:
        ctx.extra["irnet"] = dict(weight_quantizer.irnet_note)
    act = None
    if act_options is not None:
        ctx.extra.setdefault("binary_acts", {})[name] = dict(act_options)
        act = make_block_act(dict(act_options), layer)
    return BinaryBlock(layer, kind, weight_quantizer, act)


def binary_method(kind: str) -> QATMethod:
    """The engine hooks of a binary method: binary weights, a ``kind`` block for 1-bit
    activations, LSQ for 8-bit ones.

    Example:
        >>> hooks = binary_method("xnor")  # register("xnor", XNORConfig, "...")(hooks)
    """
    if kind not in KINDS:
        raise CompactnnError(f"unknown binary block kind {kind!r}; use one of {KINDS}.")
    return QATMethod(weight_quantizer=_binary_weight_quantizer, block=partial(make_block, kind))
