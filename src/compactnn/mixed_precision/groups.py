"""Residual-group pruning candidates: a whole residual stream's channels as one search choice.

Layers whose outputs meet at a residual add (a ResNet stage's stem or downsample convolution
and every block's last convolution) cannot drop channels alone: the add needs equal widths.
Their output channels, the batch norms after them and the input channels of every consumer
form one *dependency group* (the graph of torch-pruning, Fang et al., CVPR 2023, the one
:mod:`compactnn.prune.channel` prunes with). Each group becomes one exclusive choice of the
allocation with options ``keep`` and every pruning ratio of the ``ch<P>+`` candidate formats:

* sensitivity ``s[g, p] = sum_b ||y_b(G -> p) - y_b||^2 / sum_b ||y_b||^2``, the relative
  output error with only group ``g`` pruned at ratio ``p`` (the float model, the same measure
  as the per-layer sensitivities);
* latency ``t[g, p] = T_ref * (C_{g,p} - C_ref) / C_ref``: the measured relative change of
  the whole deployed model's CPU time per call ``C`` (the widest format's uniform recipe with
  only that group pruned, timed in rotating blocks beside the unpruned one; wall time where
  CPU time is not available), scaled to the per-layer table's reference time ``T_ref``;
* bytes, code bits and BOPs: the exact change over the searched layers at the widest format
  (rows removed from the group's layers, input columns removed from their consumers).

In the recipe a chosen group is a ``channel`` step at that ratio naming the group's layers:
the dependency graph then removes the consumers' inputs by itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from compactnn.core.calib import call_model, detect_call_mode, main_output
from compactnn.core.modules import Targets
from compactnn.errors import CompactnnError
from compactnn.mixed_precision.cost import biased_layers, layer_bytes
from compactnn.mixed_precision.formats import Format
from compactnn.mixed_precision.latency import (
    compressed,
    deploy_compressed,
    macs_of,
    shrinking,
    time_models,
)
from compactnn.mixed_precision.sensitivity import relative_error
from compactnn.recipe import Recipe, Step, parse_short_name


@dataclasses.dataclass
class Group:
    """One residual group: its layers, pruning options and their measured evidence.

    Attributes:
        layers: the layers writing into the stream (their output channels go together).
        ratios: the options after ``keep`` (fractions of the stream's channels removed).
        scores: ``(K + 1,)`` sensitivity per option, ``keep`` first (0).
        costs: name -> ``(K + 1,)`` change of each cost (``latency`` in ms, ``bytes``, ...).
        choice: the chosen option (0: keep).
    """

    layers: tuple[str, ...]
    ratios: tuple[float, ...]
    scores: np.ndarray
    costs: dict[str, np.ndarray]
    choice: int = 0

    @property
    def ratio(self) -> float:
        """The chosen fraction of channels removed (0 when kept)."""
        return 0.0 if self.choice == 0 else self.ratios[self.choice - 1]

    def to_dict(self) -> dict[str, Any]:
        options = ["keep", *(f"ch{round(r * 100)}" for r in self.ratios)]
        return {
            "layers": list(self.layers),
            "chosen": options[self.choice],
            "scores": dict(zip(options, map(float, self.scores), strict=True)),
            "costs": {
                k: dict(zip(options, map(float, v), strict=True)) for k, v in self.costs.items()
            },
        }


def group_step(layers: tuple[str, ...] | list[str], ratio: float) -> Step:
    """The ``channel`` step removing ``ratio`` of the channels of the stream of ``layers``."""
    step = parse_short_name(f"ch{round(ratio * 100)}").steps[0]
    return Step(step.method, step.config, Targets(names=tuple(layers)))


def residual_groups(model: nn.Module, names: list[str], example: Any) -> list[tuple[str, ...]]:
    """Groups of two or more searched layers whose output channels are coupled (by a residual
    add or a concatenation-free shared stream), from torch-pruning's dependency graph, in
    execution order of their first layer.

    Example:
        >>> residual_groups(resnet18, layer_names, x)[1]  # doctest: +SKIP
        ('layer2.0.conv2', 'layer2.0.downsample.0', 'layer2.1.conv2')
    """
    import torch_pruning as tp  # a dependency of compactnn (channel pruning)

    mods = {model.get_submodule(n): n for n in names}
    mode = detect_call_mode(model, example)
    graph = tp.DependencyGraph().build_dependency(
        model,
        example_inputs=example,
        forward_fn=lambda m, x: call_model(m, x, mode),
        output_transform=main_output,
    )
    found: dict[tuple[str, ...], int] = {}
    for i, n in enumerate(names):
        layer = model.get_submodule(n)
        fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else None
        fn = fn or tp.prune_conv_out_channels
        group = graph.get_pruning_group(layer, fn, idxs=[0])
        members = {
            mods[d.target.module]
            for d, _ in group
            if d.target.module in mods and graph.is_out_channel_pruning_fn(d.handler)
        }
        key = tuple(m for m in names if m in members)
        if len(key) > 1:
            found.setdefault(key, i)
    return sorted(found, key=found.__getitem__)


def _outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    mode = detect_call_mode(model, batches[0])
    with torch.no_grad():
        return [main_output(call_model(model, b, mode)).float() for b in batches]


def _cost_change(
    model: nn.Module, pruned: nn.Module, names: list[str], fmt: Format, macs: list[int], example
) -> dict[str, float]:
    """Change of bytes, code bits and BOPs over the searched layers at ``fmt``."""
    after = macs_of(pruned, names, example)
    out = {"bytes": 0.0, "code_bits": 0.0, "bops": 0.0}
    biased = biased_layers(model, names)  # batch-norm folding gives a bias-free conv one
    for n, m0, m1 in zip(names, macs, after, strict=True):
        a, b = model.get_submodule(n), pruned.get_submodule(n)
        out["bytes"] += layer_bytes(b, fmt, n in biased) - layer_bytes(a, fmt, n in biased)
        out["code_bits"] += (b.weight.numel() - a.weight.numel()) * fmt.weight.bits
        abits = fmt.act.bits if fmt.act is not None else 32
        out["bops"] += (m1 - m0) * fmt.weight.bits * abits
    return out


def measure_groups(
    model: nn.Module,
    names: list[str],
    ratios: list[float],
    widest: Format,
    uniform: Recipe,
    batches: list,
    example: Any,
    macs: list[int],
    reference: tuple[nn.Module, float] | None,
    sensitivity_batches: int = 4,
) -> list[Group]:
    """Every residual group of ``model`` with its options measured (see the module doc).

    ``uniform`` is the widest format's uniform recipe; ``reference`` its deployed model and the
    per-layer table's milliseconds for it (None: no latency column). A group that the channel
    step does not shrink at some ratio (too few channels, tied to the model's output) is left
    out.
    """
    found = residual_groups(model, names, batches[0])
    refs = _outputs(model, batches[:sensitivity_batches])
    groups: list[Group] = []
    deployed: dict[tuple[int, int], nn.Module] = {}
    for layers in found:
        rows = [model.get_submodule(n).weight.shape[0] for n in layers]
        scores, changes = [0.0], [{"bytes": 0.0, "code_bits": 0.0, "bops": 0.0}]
        mine: dict[tuple[int, int], nn.Module] = {}
        for r in ratios:
            pruned = compressed(model, Recipe("group", (group_step(layers, r),)), batches[:1])
            if any(
                pruned.get_submodule(n).weight.shape[0] == w
                for n, w in zip(layers, rows, strict=True)
            ):
                break  # the stream could not be pruned (output layer, too narrow)
            scores.append(relative_error(_outputs(pruned, batches[:sensitivity_batches]), refs))
            changes.append(_cost_change(model, pruned, names, widest, macs, batches[0]))
            if reference is not None:
                recipe = Recipe("group", (group_step(layers, r), *uniform.steps))
                q = compressed(model, recipe, batches)
                mine[(len(groups), len(scores) - 2)] = deploy_compressed(q, example)
        if len(scores) == len(ratios) + 1:
            deployed.update(mine)
            costs = {k: np.array([c[k] for c in changes]) for k in changes[0]}
            groups.append(Group(tuple(layers), tuple(ratios), np.array(scores), costs))
    if reference is not None and deployed:
        ref_model, ref_ms = reference
        keys = {f"g{g}-{k}": (g, k) for g, k in deployed}
        cpu: dict[str, float] = {}
        wall = time_models(
            {"ref": ref_model, **{name: deployed[gk] for name, gk in keys.items()}},
            example,
            cpu=cpu,
        )
        # CPU time per call: on a shared machine far steadier than wall time, same ratios
        ms = cpu if all(np.isfinite(v) and v > 0 for v in cpu.values()) else wall
        for g in groups:
            g.costs["latency"] = np.zeros(len(ratios) + 1)
        for name, (g, k) in keys.items():
            groups[g].costs["latency"][k + 1] = ref_ms * (ms[name] - ms["ref"]) / ms["ref"]
    return groups


def prunable(model: nn.Module, names: list[str], fmt: Format, batches: list) -> list[bool]:
    """Layers whose output channels a ``ch<P>+`` format removes on their own: pruned alone
    (on a copy), the layer shrinks and no other layer's outputs do (a layer tied to a residual
    add either stays whole or drags its coupled group along, so it does not qualify)."""
    out = [False] * len(names)
    for i, n in enumerate(names):
        q = compressed(model, Recipe("probe", (fmt.prune_step([n]),)), batches[:1])
        shrank = shrinking(model, names, q)
        out[i] = shrank[i] and sum(shrank) == 1
    return out


def check_group_request(formats: list[Format], groups: bool | None, has_latency: bool) -> bool:
    """Whether residual groups are searched: ``groups=None`` means "with a latency budget and
    ``ch<P>+`` formats"; ``True`` needs ``ch<P>+`` formats (their ratios are the options)."""
    has_prune = any(f.prune for f in formats)
    if groups is None:
        return has_latency and has_prune
    if groups and not has_prune:
        raise CompactnnError(
            "groups=True needs ch<P>+ formats among the candidates (e.g. ch50+w8a8): their "
            "pruning ratios are the residual groups' options."
        )
    return bool(groups)
