"""The binary weight quantizer and the configuration the binary methods share
(XNOR-Net, Bi-Real Net, ReActNet and the methods built on their blocks).

:class:`BinaryWeight`: ``w_b = alpha * sign(w)`` with ``alpha = mean|w|`` per output filter
(or IR-Net's Libra-PB weights), frozen as 1-bit codes with a per-filter codebook
``[-alpha, +alpha]``. :class:`BinaryConfig`: the training settings, IR-Net's options
included. The block that uses both is :class:`compactnn.engines.binary.BinaryBlock`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, fields
from functools import partial

import torch
from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.engines.binary_ops import binary_weight, sign_ste
from compactnn.engines.irnet import (
    IRNET_LR,
    T_MAX,
    T_START,
    ede_sign,
    ede_t,
    libra_codes_levels,
    libra_weight,
    weight_decay,
)
from compactnn.engines.qat import QATConfig
from compactnn.engines.qat_quantizers import WeightExport, fp16
from compactnn.errors import CompactnnError, user_stacklevel
from compactnn.quant.base import short_act_spec, short_weight_spec

KINDS = ("xnor", "bireal", "reactnet")
EDE_ON = ("both", "weights", "acts")
_log = logging.getLogger("compactnn")


class BinaryWeight(nn.Module):
    """Binary weights with a per-filter scale; 1-bit codes plus a codebook when frozen.

    Args:
        real_epochs: training epochs (counted by ``start_epoch``) during which the weights
            stay real-valued while the activations are already binary: ReActNet's first
            training stage. The last epoch always trains binary weights (when ``train`` is
            given fewer epochs than the recipe's). Outside ``train`` (no ``start_epoch``
            call) weights are binary.
        libra_pb: IR-Net's balanced, standardised weights with a power-of-two scale
            (:func:`compactnn.engines.irnet.libra_weight`) instead of ``mean|w| sign(w)``.
        ede: IR-Net's error-decay estimator as the sign's gradient, where ``ede_on`` says
            (the weights, the activations of the block that owns this quantizer, or both);
            ``t`` follows the epochs.
        t_min, t_max: EDE's first and last ``t``.
        ede_on: where EDE replaces the clipped STE: ``"both"``, ``"weights"``, ``"acts"``
            (this class's own default ``"both"``; ``BinaryConfig.ede_on``, which the
            recipes pass, defaults to ``"weights"``).
        per_step: ``t`` follows the optimizer steps (``i`` the step, ``N`` all steps) instead
            of the epochs; the steps per epoch are counted in the first epoch, which keeps
            ``t_min`` (as it does after resuming mid-epoch from a checkpoint).
        wd: L2 weight decay ``wd/2 ||w||^2`` on the latent real weights (0: none).
    """

    spec = QuantSpec(bits=1, symmetric=False, granularity="channel")

    def __init__(
        self,
        real_epochs: int = 0,
        libra_pb: bool = False,
        ede: bool = False,
        t_min=T_START,
        *,
        t_max: float = T_MAX,
        ede_on: str = "both",
        per_step: bool = False,
        wd: float = 0.0,
    ) -> None:
        super().__init__()
        self.t_min, self.t_max = t_min, t_max
        self.real_epochs = real_epochs
        self.real = False
        self.libra_pb = libra_pb
        self.ede = ede
        self.ede_weights = ede and ede_on in ("both", "weights")
        self.ede_acts = ede and ede_on in ("both", "acts")
        self.per_step = per_step
        self.wd = wd
        self.t = t_min  # EDE's t: set by start_epoch (and each step with per_step)
        self._epoch: int | None = None
        self._epochs = 1
        self._seen = 0  # training forwards (optimizer steps) in this epoch
        self._steps_per_epoch = 0

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        """Real-valued weights during the first ``real_epochs`` epochs, binary after; EDE's
        ``t`` of this epoch."""
        self.real = epoch < min(self.real_epochs, epochs - 1)
        if self._epoch is not None and epoch == self._epoch + 1 and self._seen > 0:
            self._steps_per_epoch = self._seen  # counted over a whole epoch
        self._epoch, self._epochs, self._seen = epoch, epochs, 0
        self.t = ede_t(epoch, epochs, self.t_min, self.t_max)

    def _step(self) -> None:
        """Count a training step; with ``per_step``, move ``t`` to this step's value."""
        if self._epoch is None or not (self.training and torch.is_grad_enabled()):
            return
        spe = self._steps_per_epoch
        if self.per_step and spe > 0:
            i, n = self._epoch * spe + self._seen, self._epochs * spe
            self.t = ede_t(i, n, self.t_min, self.t_max)
        self._seen += 1

    def sign_fn(self):
        """The sign with this quantizer's gradient: EDE at ``t``, or the clipped STE."""
        return partial(ede_sign, t=self.t) if self.ede_weights else sign_ste

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self._step()
        w = weight_decay(w, self.wd) if self.training else w
        if self.real:
            return w
        if self.libra_pb:
            return libra_weight(w, self.sign_fn())
        return binary_weight(w, self.sign_fn())

    def export(self, w: torch.Tensor) -> WeightExport:
        """1-bit codes ``[w >= 0]`` and the float16 codebook ``[-alpha, +alpha]`` per filter
        (Libra-PB: ``[w_std >= 0]`` and ``[-2^s, +2^s]``)."""
        w = w.detach().float()
        ones = torch.ones(w.shape[0], 1)
        if self.libra_pb:
            codes, levels = libra_codes_levels(w)
            return WeightExport(codes, ones, torch.zeros_like(ones), self.spec, levels)
        alpha = w.abs().reshape(w.shape[0], -1).mean(dim=1)  # (out,)
        levels = fp16(torch.stack([-alpha, alpha], dim=-1)).reshape(-1, 1, 2)
        codes = (w >= 0).to(torch.uint8)
        return WeightExport(codes, ones, torch.zeros_like(ones), self.spec, levels)


@dataclass(frozen=True)
class BinaryConfig(QATConfig):
    """Shared by the binary methods: 1-bit weights; 1-bit activations through a binary
    block (or, with ``a8``, LSQ activations). The default specs are those of ``w1a1-<name>``.

    Args:
        real_weight_epochs: first epochs trained with binary activations but real-valued
            weights (ReActNet's two-stage training); the weights are binarised after them.
            Must be below ``epochs``; 0 binarises weights from the start.
        libra_pb: IR-Net's Libra-PB weights: per filter, standardised (zero mean, unit
            variance) before the sign, with an integer power-of-two scale ``2^s``.
        ede: IR-Net's error-decay estimator for the sign's gradient,
            ``k t (1 - tanh^2(t x))`` with ``t`` from ``ede_t_min`` to 10 over the epochs;
            on the weights only by default (``ede_on``; the paper: weights and activations).
        ede_t_min: EDE's first ``t``. Default 1.0 (``k = 1``: a smooth clipped STE first),
            measured better than the paper's 0.1 (an identity-like gradient, ``k = 10``) when
            fine-tuning a trained float model for a few epochs (docs/lowbit-training.md).
        ede_t_max: EDE's last ``t`` (the paper's 10).
        ede_on: where EDE replaces the clipped STE: ``"weights"`` (default: the
            activations keep the kind's own gradient), ``"both"`` (the paper) or ``"acts"``.
            Chosen on a validation split of mnist-cnn's training digits (session 9,
            docs/lowbit-training.md).
        ede_per_step: ``t`` rises over the optimizer steps (the paper's ``i / N`` with ``i``
            the step) instead of once per epoch (off: not better on the validation split).
        irnet_lr: the weights' learning rate whenever ``libra_pb`` or ``ede`` is on (it
            replaces the method's default ``lr``; part of the IR-Net options, measured in
            docs/lowbit-training.md); an ``lr`` of your own (another value) is kept; None:
            keep ``lr``. Without the options it is unused. Replacing the default ``lr``
            warns, naming both values; the frozen model's ``extra["irnet"]`` records the
            ``lr`` trained at and the one given (``recipe_lr``).
        irnet_wd: L2 weight decay on the binary layers' latent weights whenever
            ``libra_pb`` or ``ede`` is on (0: none).
        min_steps: :func:`compactnn.train` without ``epochs=`` trains at least this many
            optimizer steps (more epochs on a small dataset); 0: the recipe's epochs.
        warmup_steps: linear learning-rate warmup over the first steps of
            :func:`compactnn.train` (then the cosine decay); 0: none.
        recalibrate_batches: :func:`compactnn.train` re-estimates the blocks' batch-norm
            statistics on up to this many training batches before freezing (and before
            scoring each epoch on ``eval_data``): :func:`recalibrate_norms`; 0: never.
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(1))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(1))
    epochs: int = 6
    lr: float = 1e-3
    lr_quant: float = 1e-2
    real_weight_epochs: int = 0
    libra_pb: bool = False
    ede: bool = False
    ede_t_min: float = T_START
    ede_t_max: float = T_MAX
    ede_on: str = "weights"
    ede_per_step: bool = False
    irnet_lr: float | None = IRNET_LR
    irnet_wd: float = 0.0
    min_steps: int = 0
    warmup_steps: int = 0
    recalibrate_batches: int = 100

    def __post_init__(self) -> None:
        name = type(self).method_name or "binary"
        super().__post_init__()  # types first (a YAML "3e-3" is a string)
        if self.irnet_lr is not None and not self.irnet_lr > 0:
            raise CompactnnError(
                f"{name}: irnet_lr={self.irnet_lr!r} must be > 0 (or None: use lr)."
            )
        for key in ("min_steps", "warmup_steps", "recalibrate_batches"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise CompactnnError(f"{name}: {key}={v!r} must be a non-negative integer.")
        if not isinstance(self.real_weight_epochs, int) or not (
            0 <= self.real_weight_epochs < max(self.epochs, 1)
        ):
            raise CompactnnError(
                f"{name}: real_weight_epochs={self.real_weight_epochs!r} must be an integer in "
                f"[0, epochs={self.epochs}): the last epochs must train binary weights."
            )
        if not 0 < self.ede_t_min <= self.ede_t_max <= 100:
            raise CompactnnError(
                f"{name}: ede_t_min={self.ede_t_min}, ede_t_max={self.ede_t_max} must satisfy "
                "0 < ede_t_min <= ede_t_max <= 100 (the paper: 0.1 and 10)."
            )
        if self.ede_on not in EDE_ON:
            raise CompactnnError(f"{name}: ede_on={self.ede_on!r}; use one of {EDE_ON}.")
        if not self.irnet_wd >= 0:
            raise CompactnnError(f"{name}: irnet_wd={self.irnet_wd!r} must be >= 0.")
        if self.weight.bits != 1:
            raise CompactnnError(f"{name} binarises weights: use w1 (e.g. w1a1-{name}).")
        if self.act is not None and self.act.bits not in (1, 8):
            raise CompactnnError(
                f"{name}: activations are binary (a1) or 8-bit (a8), not {self.act.bits} bits."
            )
        object.__setattr__(self, "recipe_lr", self.lr)  # not a field: the lr as given
        if (self.libra_pb or self.ede) and self.irnet_lr is not None:
            self._use_irnet_lr(name)

    def _use_irnet_lr(self, name: str) -> None:
        """With libra_pb/ede, ``lr`` becomes ``irnet_lr`` unless the user set their own:
        an ``lr`` other than the method's default (or than the default ``irnet_lr``, which a
        saved recipe of such a run holds) is theirs and is kept. Replacing the default lr
        by the default irnet_lr is announced (a YAML recipe may spell the default lr out),
        naming both values; the lr as given stays in ``recipe_lr``."""
        defaults = {f.name: f.default for f in fields(self)}
        lr, irnet_lr = self.lr, self.irnet_lr
        if lr == irnet_lr:
            return
        if lr not in (defaults["lr"], defaults["irnet_lr"]):  # the user's own lr: kept
            if irnet_lr != defaults["irnet_lr"]:  # and their own irnet_lr: say which wins
                warnings.warn(
                    f"{name}: lr={lr:g} and irnet_lr={irnet_lr:g} are both set with "
                    f"libra_pb/ede; the weights train at lr={lr:g} (to train at {irnet_lr:g}, "
                    "set lr to it).", stacklevel=user_stacklevel(),
                )  # fmt: skip
            return
        if (lr, irnet_lr) == (defaults["lr"], defaults["irnet_lr"]):  # both unset, it seems
            warnings.warn(
                f"{name}: with libra_pb/ede the weights train at irnet_lr={irnet_lr:g} instead "
                f"of lr={lr:g} ({name}'s default lr, so taken as unset); to train at {lr:g}, "
                "set irnet_lr: null (None in Python); any other lr is kept.",
                stacklevel=user_stacklevel(),
            )  # fmt: skip
        else:  # the user's own irnet_lr
            _log.info("%s: the weights train at irnet_lr=%g, not lr=%g.", name, irnet_lr, lr)
        object.__setattr__(self, "lr", irnet_lr)  # the IR-Net options' own lr
