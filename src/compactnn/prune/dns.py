"""Dynamic Network Surgery (Guo, Yao & Chen, NeurIPS 2016).

Pruning and splicing interleave with training. Every weight keeps training, pruned or not:
the forward pass uses ``W * T`` but the gradient of ``W * T`` updates the dense ``W`` (a
straight-through parametrization). Every ``frequency`` steps the mask ``T`` is revised with
two thresholds ``a < b`` around the layer's magnitude quantile ``t`` at the target sparsity:
``|w| < a`` is pruned, ``|w| > b`` is spliced back (restored), and weights in between keep
their state. The band stops weights near the threshold from flipping at every update.

In your own loop::

    pruner = DNSPruner(model, DNSConfig(sparsity=0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)   # after the pruner
    for x, y in loader:
        loss(model(x), y).backward(); opt.step(); opt.zero_grad()
        pruner.step()
    pruner.finish()
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.engines.prune_schedule import (
    ScheduledPruner,
    prune_while_distilling,
    weight_layer_names,
)
from compactnn.errors import CompactnnError
from compactnn.prune.masks import (
    check_removes_some,
    check_sparsity,
    dense_weight,
    set_mask,
    skip_tied,
)
from compactnn.prune.shortnames import percent_fraction
from compactnn.prune.stats import model_counts, record_sparsity
from compactnn.prune.train import collapse_words, output_summary, warn_if_collapsed
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_short_name


@dataclasses.dataclass(frozen=True)
class DNSConfig(MethodConfig):
    """Dynamic Network Surgery.

    Args:
        sparsity: target fraction of pruned weights per layer, in [0, 1).
        layer_sparsity: per-layer overrides of ``sparsity``, ``{name: fraction}`` (stored as
            sorted ``(name, fraction)`` pairs). Small first and last layers tolerate much less
            pruning than the large middle ones, so a uniform rate is rarely the best one:
            the DNS paper keeps 14% of LeNet-5's first conv but 0.7% of its first FC layer.
        band: half-width of the hysteresis band: ``a = (1 - band) t``, ``b = (1 + band) t``.
        frequency: steps between mask revisions.
        surgery_steps: steps during which masks are revised (inside ``compress``).
        finetune_steps: further steps with the masks fixed (inside ``compress``).
        lr: Adam learning rate inside ``compress``.
    """

    sparsity: float = 0.9
    layer_sparsity: tuple[tuple[str, float], ...] = ()
    band: float = 0.1
    frequency: int = 10
    # 1e-4 and 200+100 steps left 90%-sparse CNNs answering one class (10% top-1); these
    # hold on mnist-cnn and a digits CNN (docs/pruning.md, "Self-distillation defaults")
    surgery_steps: int = 600
    finetune_steps: int = 400
    lr: float = 3e-3

    def needs_data(self) -> bool:
        """Surgery and fine-tuning self-distil on the calibration batches."""
        return self.surgery_steps > 0 or self.finetune_steps > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.sparsity)
        pairs = self.layer_sparsity
        pairs = pairs.items() if isinstance(pairs, dict) else pairs
        try:
            pairs = tuple(sorted((str(n), float(v)) for n, v in pairs))
        except (TypeError, ValueError) as exc:
            raise CompactnnError(
                f"DNSConfig.layer_sparsity={self.layer_sparsity!r} must map layer names to "
                "fractions, e.g. {'fc1': 0.95, 'conv1': 0.5}."
            ) from exc
        for name, value in pairs:
            check_sparsity(value, f"layer_sparsity[{name!r}]")
        object.__setattr__(self, "layer_sparsity", pairs)
        if not any(v for _, v in pairs):  # a layer's own nonzero fraction prunes something
            example = "sparsity=0.9 (short name sp90-dns)"
            check_removes_some(self.sparsity, "DNSConfig(sparsity=0)", "weights", example)
        if not 0.0 <= self.band < 1.0:
            raise CompactnnError(f"DNSConfig.band={self.band} must lie in [0, 1).")
        if self.frequency < 1 or self.surgery_steps < 0 or self.finetune_steps < 0:
            raise CompactnnError("DNSConfig: frequency >= 1, surgery/finetune steps >= 0.")

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["layer_sparsity"] = dict(self.layer_sparsity)  # YAML-friendly mapping
        return out

    def sparsity_for(self, name: str) -> float:
        """The target sparsity of layer ``name`` (its override, else ``sparsity``)."""
        return dict(self.layer_sparsity).get(name, self.sparsity)


def dns_thresholds(weight: torch.Tensor, sparsity: float, band: float) -> tuple[float, float]:
    """``(a, b)``: prune below ``a``, splice above ``b``; ``t`` is the |w| quantile."""
    if sparsity == 0.0:
        return 0.0, 0.0
    mags = weight.detach().abs().reshape(-1).float()
    t = float(torch.kthvalue(mags, max(1, round(sparsity * mags.numel()))).values)
    return (1.0 - band) * t, (1.0 + band) * t


def revise_mask(weight: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The DNS mask rule: 0 below ``low``, 1 above ``high``, unchanged in between."""
    mag = weight.detach().abs()
    new = mask.clone()
    new[mag < low] = 0.0
    new[mag > high] = 1.0
    return new


class DNSPruner(ScheduledPruner):
    """Surgery schedule for a training loop: call ``step()`` after every optimizer step.

    Args:
        model: pruned in place; masks are attached at construction (build the optimizer
            afterwards).
        config: thresholds and schedule (``surgery_steps`` bounds when masks change).
        names: layers to prune (default: every Linear/Conv weight layer).
    """

    def __init__(self, model: nn.Module, config: DNSConfig, names: list[str] | None = None) -> None:
        names = weight_layer_names(model) if names is None else list(names)
        unknown = sorted(set(dict(config.layer_sparsity)) - set(names))
        if unknown:
            raise CompactnnError(
                f"DNSConfig.layer_sparsity names {unknown}, which are not among the pruned "
                f"layers {names}; use their module names."
            )
        super().__init__(model, names, straight_through=True)
        self.config = config
        self.spliced = 0  # weights restored over the run (diagnostic)
        self.revise(band=0.0)  # the first cut is a plain threshold: no state to keep yet
        self.spliced = 0

    def revise(self, band: float | None = None) -> None:
        """Prune and splice every layer once with its current two thresholds."""
        band = self.config.band if band is None else band
        with torch.no_grad():
            for n in self.names:
                w = dense_weight(self.model, n)
                old = self.mask(n)
                low, high = dns_thresholds(w, self.config.sparsity_for(n), band)
                new = revise_mask(w, old, low, high)
                self.spliced += int(((old == 0) & (new == 1)).sum())
                set_mask(self.model, n, new)

    def update(self, step: int) -> None:
        """Revise the masks every ``frequency`` steps during surgery."""
        if step <= self.config.surgery_steps and step % self.config.frequency == 0:
            self.revise()


@register("dns", DNSConfig, "Dynamic Network Surgery: prune and splice during training")
def apply_dns(
    model: nn.Module, targets: dict[str, nn.Module], config: DNSConfig, ctx: CompressContext
) -> nn.Module:
    """Surgery while distilling from the unpruned model on the calibration batches, then
    fine-tuning with the masks fixed."""
    counts = model_counts(model, ctx)  # params and MACs before, for the record
    reference = output_summary(model, ctx)  # the unpruned outputs, for the collapse check
    steps = config.surgery_steps + config.finetune_steps
    pruner = prune_while_distilling(
        model,
        skip_tied(model, targets, ctx, "dns"),
        ctx,
        lambda m, names: DNSPruner(m, config, names),
        steps,
        config.lr,
        "dns",
    )
    ctx.notes.append(f"dns: {pruner.spliced} pruned weights were spliced back during surgery")
    warn_if_collapsed(model, reference, ctx, *_collapse_words(config))
    record_sparsity(ctx, "dns", {n: model.get_submodule(n) for n in pruner.names}, model, counts)
    return model


def _collapse_words(config: DNSConfig) -> tuple[str, str]:
    """The collapse warning's words for a DNS step (:func:`collapse_words`)."""
    s, a, b = config.sparsity, config.surgery_steps, config.finetune_steps
    fields = {"sparsity": s, "surgery_steps": 2 * max(a, 300), "finetune_steps": 2 * max(b, 200)}
    lower = [f"lower the sparsity (e.g. sp{round(50 * s)}-dns)"]
    steps, pruner = f"{a}+{b}", " with a DNSPruner"
    return collapse_words("dns", [f"sparsity {s:g}"], steps, config.lr, lower, fields, pruner)


@register_short_name(r"sp(?P<p>\d+)-dns", "sp<P>-dns", ("sp90-dns",))
def _short_name(m: re.Match[str]) -> Recipe:
    config = DNSConfig(sparsity=percent_fraction(m["p"], m.string))
    return Recipe(m.string, (Step("dns", config),))
