"""What every post-training quantization method shares: its config base and the steps of
the layer flow (fold batch norms, pick the layers, give the first and last layers their 8-bit
convention, calibrate activation quantizers). The engines in :mod:`compactnn.engines` chain
these steps (:func:`compactnn.engines.layerwise.quantize_layers` is the plain layer-wise flow).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.core.fold import fold_batchnorm
from compactnn.core.modules import DEFAULT_CLASSES, Targets, set_module
from compactnn.core.qembedding import (
    embedding_spec,
    embedding_unsupported,
    lookup_factor,
    quantize_embedding_rtn,
    table_aliases,
    tie_to_table,
    tied_heads,
)
from compactnn.core.qlayers import (
    QUANTIZABLE,
    ActQuantizer,
    has_integer_weight,
    is_quant_layer,
)
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError, name_list
from compactnn.quant.ends import model_ends, run_with_heads

LayerSpecs = dict[str, tuple[QuantSpec, QuantSpec | None]]


GROUP_ACT = ("rtn", "gptq")  # the methods whose configs set group_act


@dataclasses.dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """Settings shared by quantization methods.

    Args:
        weight: how weights are quantized.
        act: how the activation entering each quantized layer is quantized (None: weight-only).
        first_last_bits: the model's first and last quantizable layers, and each whose
            output is one of the model's outputs (see
            :func:`~compactnn.quant.ends.model_ends`), keep at least this many bits for
            weights and activations,
            the field's convention, in the step that quantizes them; None quantizes them
            like the rest.
        fold_bn: fold ``conv -> batchnorm`` pairs before quantizing (CNNs).
    """

    weight: QuantSpec = dataclasses.field(default_factory=lambda: QuantSpec(bits=8))
    act: QuantSpec | None = None
    first_last_bits: int | None = 8
    fold_bn: bool = True
    # per-group dynamic activations (act granularity "group") are simulated by this method
    group_act: ClassVar[bool] = False

    def needs_data(self) -> bool:
        """Activation grids are calibrated on data, and so are data-driven methods."""
        return self.act is not None or super().needs_data()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.weight, QuantSpec):
            raise CompactnnError(f"{type(self).__name__}.weight must be a QuantSpec")
        if isinstance(self.act, QuantSpec):
            # an act spec without a granularity is per tensor, as in a YAML recipe
            object.__setattr__(self, "act", self.act.for_activation())
        if self.act is not None and self.act.granularity != "tensor":
            self._check_group_act()
        if self.first_last_bits is not None and not 1 <= self.first_last_bits <= 8:
            raise CompactnnError(f"first_last_bits={self.first_last_bits} must be 1..8 or None.")

    def _check_group_act(self) -> None:
        """Per-group activations: dynamic, symmetric, on the weights' groups, for the
        methods that declare them (``group_act``); anything else is per tensor."""
        name, act, w = type(self).__name__, self.act, self.weight
        if act.granularity != "group" or not self.group_act:
            raise CompactnnError(
                f"{name}: activation quantization is per-tensor (set granularity='tensor' or "
                "leave it out); per-group activations (granularity='group', the grid of ONNX "
                "Runtime's MatMulNBits at accuracy_level=4) are for the methods "
                f"{' and '.join(GROUP_ACT)} (e.g. 'w4a8g-g32-gptq')."
            )
        if not act.symmetric or w.granularity != "group" or act.group_size != w.group_size:
            raise CompactnnError(
                f"{name}: per-group activations are symmetric and grouped like the weights: "
                f"use act=QuantSpec(bits={act.bits}, granularity='group', group_size="
                f"{w.group_size or 'G'}) with weight granularity='group' of the same size "
                f"(got act symmetric={act.symmetric}, group_size={act.group_size}; weight "
                f"granularity={w.granularity!r}, group_size={w.group_size})."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str | None = None) -> QuantConfig:
        """The config from a YAML/JSON mapping; an ``act`` mapping without ``granularity`` is
        per-tensor (as in Python); ``group`` is checked like in Python (``group_act``); any
        other is refused here, with its field path.

        Example:
            >>> QuantConfig.from_dict({"act": {"bits": 4}}).act.granularity
            'tensor'
        """
        where = where or cls.__name__
        act = data.get("act") if isinstance(data, dict) else None
        granularity = act.get("granularity") if isinstance(act, dict) else None
        if isinstance(granularity, str) and granularity not in ("tensor", "group"):
            raise CompactnnError(
                f"{where}.act.granularity={granularity!r}: activation quantization is "
                "per-tensor; set granularity: tensor (or leave it out)."
            )
        return super().from_dict(data, where)

    @classmethod
    def from_short(
        cls,
        wbits: int,
        abits: int | None,
        group: int | None,
        range_method: str = "minmax",
        **kwargs,
    ) -> QuantConfig:
        """Config of a short name ``w<W>[a<A>][-g<G>]``.

        Weights: symmetric int8 at 8 bits (what integer kernels take), asymmetric below 8
        bits (the zero point buys back a level); per output channel, or per group of ``G``.
        Activations: asymmetric unsigned, per tensor.
        """
        weight = short_weight_spec(wbits, group, range_method)
        act = short_act_spec(abits, range_method) if abits is not None else None
        return cls(weight=weight, act=act, **kwargs)


def short_weight_spec(
    bits: int, group: int | None = None, range_method: str = "minmax"
) -> QuantSpec:
    """The weight spec of a short name ``w<bits>[-g<group>]``.

    Symmetric int8 at 8 bits (what integer kernels take), asymmetric below (the zero point
    buys back a level); per output channel, or per group of ``group`` inputs.

    Example:
        >>> short_weight_spec(4, 32).granularity
        'group'
    """
    return QuantSpec(
        bits=bits,
        symmetric=bits == 8,
        granularity="group" if group else "channel",
        group_size=group,
        range_method=range_method,
    )


def short_act_spec(bits: int, range_method: str = "minmax") -> QuantSpec:
    """The activation spec of a short name ``a<bits>``: asymmetric unsigned, per tensor.

    Example:
        >>> short_act_spec(8).symmetric
        False
    """
    return QuantSpec(bits=bits, symmetric=False, granularity="tensor", range_method=range_method)


def prepare_model(model: nn.Module, config: QuantConfig, ctx: CompressContext) -> None:
    """Fold batch norms once per compress call."""
    if config.fold_bn and not ctx.extra.get("bn_folded"):
        ctx.folded_bn.extend(fold_batchnorm(model))
        ctx.extra["bn_folded"] = True


RECURRENT = (nn.RNNBase, nn.RNNCellBase)  # weights named weight_ih_l0, ...: no method's layer


def unquantizable_reason(m: nn.Module) -> str:
    """Why a targeted layer of a type no method quantizes stays in float.

    Example:
        >>> unquantizable_reason(nn.GRU(4, 8))
        'GRU is not a quantizable layer type: recurrent weights weight_ih_l0, weight_hh_l0'
    """
    why = f"{type(m).__name__} is not a quantizable layer type"
    if isinstance(m, RECURRENT):
        names = [n for n, p in m.named_parameters(recurse=False) if p.dim() >= 2][:2]
        why += f": recurrent weights {', '.join(names)}"
    return why


def split_supported(targets: dict[str, nn.Module], ctx: CompressContext) -> dict[str, nn.Module]:
    """Targets this library can quantize; the rest that hold weights (a ``.weight``, or
    parameters of their own such as a GRU's ``weight_ih_l0``) are recorded as kept in float,
    with the reason."""
    supported = {}
    for name, m in targets.items():
        if is_quant_layer(m):
            continue  # already quantized by an earlier step
        if isinstance(m, QUANTIZABLE):
            supported[name] = m
        elif getattr(m, "weight", None) is not None or any(True for _ in m.parameters(False)):
            ctx.float_layers[name] = unquantizable_reason(m)
    return supported


def ordered_ends(
    model: nn.Module, layers: dict[str, nn.Module], ctx: CompressContext
) -> tuple[list[str], set[str]]:
    """``(names, ends)``: the names of ``layers`` in execution order (those that never ran
    last), and those of them the first/last-layer convention applies to
    (:func:`~compactnn.quant.ends.model_ends`)."""
    quantizable = [n for n, m in model.named_modules() if n and isinstance(m, QUANTIZABLE)]
    ran, heads = [], set()
    if ctx.batches and (every := list(dict.fromkeys([*quantizable, *layers]))):
        ran, heads = run_with_heads(model, every, lambda m: ctx.run(m, ctx.batches[0]))
    seen = set(ran)
    names = [n for n in ran if n in layers] + [n for n in layers if n not in seen]
    return names, model_ends(quantizable, ran, heads) & set(names)


def layer_specs(
    model: nn.Module, layers: dict[str, nn.Module], config: QuantConfig, ctx: CompressContext
) -> LayerSpecs:
    """Weight and activation spec per layer of the step (in execution order), with the
    first/last-layer convention applied.

    The convention raises the model's first and last quantizable layers (every
    ``Linear``/``Conv1d``/``Conv2d`` of ``model``, quantized or not, targeted or not), and
    each whose output is one of the model's outputs (every head of a multi-output model:
    :func:`~compactnn.quant.ends.model_ends`), when they are among ``layers``; a step that
    quantizes none of them promotes nothing, whatever layer it starts or ends on.
    """
    names, ends = ordered_ends(model, layers, ctx)
    specs: LayerSpecs = {n: (config.weight, config.act) for n in names}
    fl = config.first_last_bits
    if fl is not None:
        for n in sorted(ends):
            w = config.weight
            if w.bits < fl:  # raised to the convention's width, with its 8-bit grid if 8
                w = dataclasses.replace(w, bits=fl, symmetric=w.symmetric or fl == 8)
            a = config.act
            a = dataclasses.replace(a, bits=max(a.bits, fl)) if a is not None else None
            specs[n] = (w, a)
        note_raised(specs, config, ctx)
    return specs


def _bits(w: QuantSpec, a: QuantSpec | None) -> str:
    return f"w{w.bits}" + (f"a{a.bits}{'g' * (a.granularity == 'group')}" if a is not None else "")


def note_raised(specs: LayerSpecs, config: QuantConfig, ctx: CompressContext) -> None:
    """Say which layers the first/last-layer rule raised above the step's bits and how to
    turn it off; warn when it raised every layer of the step (the recipe's bits then apply
    to none: a w4a8 step gives the w8a8 model)."""
    asked = _bits(config.weight, config.act)
    raised = [n for n, (w, a) in specs.items() if _bits(w, a) != asked]
    if not raised:
        return
    got = _bits(*specs[raised[0]])
    off = (
        "first_last_bits: null in the step's config of a YAML recipe (Python: the method's "
        "config with first_last_bits=None) quantizes them like the rest"
    )
    if len(raised) == len(specs):
        ctx.warn(
            f"{type(config).__name__}: the first/last-layer rule (first_last_bits="
            f"{config.first_last_bits}) raised every layer this step quantizes to {got} "
            f"({', '.join(raised)}: the model's first and last Linear/Conv1d/Conv2d layers "
            "and those whose outputs are the model's), "
            f"so no layer is at the recipe's {asked} and the artifact is the {got} one; {off}."
        )
    else:
        ctx.notes.append(
            f"first/last-layer rule (first_last_bits={config.first_last_bits}): "
            f"{', '.join(raised)} at {got} instead of {asked}; {off}"
        )


def calibrate_activations(model: nn.Module, ctx: CompressContext) -> None:
    """Observe every uncalibrated input quantizer on the calibration data, then fix ranges."""
    named = [
        (n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer) and not m.calibrated
    ]
    quantizers = [m for _, m in named]
    if not quantizers:
        return
    if not ctx.batches:
        raise CompactnnError(
            "activation quantization needs calibration data: pass calib_data= or use a "
            "weight-only recipe (e.g. w4-g128)."
        )
    for q in quantizers:
        q.start_observing()
    ctx.run_all(model, desc="calibrating activations")
    unseen = [n.rsplit(".", 1)[0] for n, q in named if q.observer.min is None]  # its layer
    if unseen:
        for q in quantizers:
            q.observer = None
        raise CompactnnError(
            f"{len(unseen)} quantized layers never ran on the calibration data, so their "
            f"activation ranges are unknown: {name_list(unseen)}. Pass calib_data= that "
            "reaches them (the model's forward must call them), exclude them with the step's "
            "targets.ignore, or use a weight-only recipe (e.g. w4-g128)."
        )
    for q in quantizers:
        q.finish_observing()


def check_group_sizes(layers: dict[str, nn.Module], specs: LayerSpecs) -> None:
    """Fail before any work when a group size does not divide a layer's input dimension,
    naming the layers and either a group size of 8 to 128 that divides the input dimension
    of every group-quantized layer or, when none does, that there is none
    (:func:`group_size_message`); or when a convolution is given per-group activations
    (they group a token's features, the last dimension of a Linear layer's input)."""
    convs = [
        n
        for n, (_, aspec) in specs.items()
        if aspec is not None
        and aspec.granularity == "group"
        and not isinstance(layers[n], nn.Linear)
    ]
    if convs:
        raise CompactnnError(
            f"per-group activations (a<A>g) group a token's features, the input of a Linear "
            f"layer; convolution layers cannot take them: {name_list(convs)}. Use per-tensor "
            "activations for a CNN (e.g. w4a8), or leave those layers out (--ignore NAME, "
            "compress(ignore=[...]))."
        )
    bad: dict[str, int] = {}
    dims: list[int] = []
    group = 0
    for name, (wspec, _) in specs.items():
        if wspec.granularity == "group":
            k = layers[name].weight[0].numel()
            dims.append(k)
            if k % wspec.group_size:
                bad[name], group = k, wspec.group_size
    if bad:
        raise CompactnnError(group_size_message(group, bad, dims))


FITTING_GROUPS = (8, 16, 32, 64, 128)  # the group sizes a message suggests


def group_size_message(group: int, bad: dict[str, int], dims: list[int] | None = None) -> str:
    """Why ``group`` fails on the layers ``bad`` (name -> input dimension) and the way out:
    the largest of 8 to 128 that divides every dimension of ``bad`` and ``dims`` (all the
    group-quantized layers' input dimensions), or, when none does, that there is none.

    Example:
        >>> group_size_message(128, {"fc": 64})[:71]
        'group_size=128 does not divide the input dimension of 1 layer: fc (64).'
        >>> "group_size=64 divides every one (-g64" in group_size_message(128, {"fc": 64})
        True
        >>> "No group size of 8 to 128 divides" in group_size_message(16, {"conv": 9})
        True
    """
    common = math.gcd(*bad.values(), *(dims or ()))
    fits = max((g for g in FITTING_GROUPS if common % g == 0), default=None)
    listed = ", ".join(f"{n} ({k})" for n, k in list(bad.items())[:8])
    more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    plural = "s" if len(bad) > 1 else ""
    way = "leave those layers in float (--ignore NAME, compress(ignore=[...]), or the step's "
    way += "targets.ignore)"
    hint = f"group_size={fits} divides every one (-g{fits} in a short name), or {way}"
    none = (
        f"No group size of 8 to 128 divides every group-quantized layer's input dimension "
        f"(their greatest common divisor is {common}): {way}"
    )
    return (
        f"group_size={group} does not divide the input dimension of {len(bad)} layer{plural}: "
        f"{listed}{more}. {hint if fits else none}; per-channel weights (no -g) fit any layer."
    )


def wants_embeddings(config: QuantConfig, step_targets: Targets) -> bool:
    """Embeddings named by the step's classes, or steps on the default classes that are
    weight-only or quantize activations at run time (``a8g`` per group, ``a8d`` per tensor:
    nothing to calibrate, delivered on ONNX Runtime, whose lookups read quantized tables)."""
    if "Embedding" in step_targets.classes:
        return True
    act = config.act
    dynamic = act is None or act.granularity == "group" or getattr(act, "dynamic", False)
    return dynamic and set(step_targets.classes) == set(DEFAULT_CLASSES)


def check_shared_factors(tables: dict[str, nn.Module]) -> None:
    """Refuse tables sharing one weight (T5, BART: ``shared`` and ``*.embed_tokens``) whose
    lookups are scaled by different factors (:func:`~compactnn.core.qembedding.lookup_factor`;
    none counts as 1): one quantized module serves them all, with one factor.

    Example:
        >>> check_shared_factors({"a": nn.Embedding(4, 2), "b": nn.Embedding(4, 2)})
    """
    factors = {n: lookup_factor(m) for n, m in tables.items()}
    if len({1.0 if f is None else f for f in factors.values()}) > 1:
        named = ", ".join(f"{n} (embed_scale {f})" for n, f in factors.items())
        raise CompactnnError(
            f"{named} share one table but scale its lookup differently, which one quantized "
            f"table cannot do: keep them in float (targets: {{ignore: {list(factors)}}})."
        )


def quantize_embeddings(
    model: nn.Module,
    targets: dict[str, nn.Module],
    step_targets: Targets,
    config: QuantConfig,
    ctx: CompressContext,
) -> dict[str, nn.Module]:
    """Quantize the step's embedding tables with round-to-nearest; return the rest.

    Which tables: those the step's classes name (``Embedding``), and, for weight-only and
    ``a8g`` steps on the default classes, every ``nn.Embedding`` whose name the step's
    ``names`` / ``ignore`` admit (opt out with ``ignore=["*embeddings*"]`` or
    ``targets.classes: [Linear]``). Each table takes
    :func:`~compactnn.core.qembedding.embedding_spec` of the recipe's weight spec: the token
    table (the one with the most rows) at the recipe's bits, the other tables (positions,
    token types: small, and added to every token) at ``first_last_bits``.
    A Linear tied to a table (an LM head) is quantized with it when the step targets both
    (else both stay float): the table takes the head's grid (``first_last_bits``: the head
    is the last layer), the head reads the same codes, so the tie survives, stored once.
    GPTQ, AWQ and the other solvers never see the tables or tied heads (not returned).

    Example:
        >>> rest = quantize_embeddings(model, targets, step.targets, config, ctx)  # doctest: +SKIP
    """
    rest = {n: m for n, m in targets.items() if not isinstance(m, nn.Embedding)}
    wanted = wants_embeddings(config, step_targets)
    heads = tied_heads(model)
    aliases = table_aliases(model)  # tables sharing one weight are quantized as one
    tables = [
        (n, m) for n, m in model.named_modules() if n in aliases and not has_integer_weight(m)
    ]
    rows = {n: m.num_embeddings for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    token_table = max(rows, key=rows.get) if rows else None
    for name, emb in tables:
        names = [name, *aliases[name]]
        head_name, head = next((heads[n] for n in names if n in heads), (None, None))
        head_targeted = head_name in rest
        left = [n for n in names if not step_targets.name_matches(n)]
        pair = ", ".join(n for n in (head_name, *names) if n)  # tied: both quantized or neither
        fix = f"so both stay float: name {pair} in one step's targets to quantize them as one table"
        if left or not (wanted or head_targeted):
            kept = left[0] if left else name
            if head_targeted:  # quantizing the head alone would untie it: keep both float
                rest.pop(head_name)
                ctx.float_layers[head_name] = f"tied to {kept}, which the step leaves out, {fix}"
            if left and (wanted or head_targeted):  # nor some of the tied tables alone
                for n in (n for n in names if n not in left):
                    ctx.float_layers[n] = f"tied to {kept}, which the step leaves out, {fix}"
            continue
        group = {n: model.get_submodule(n) for n in names}  # all of them, not just the first
        why = next((w for m in group.values() if (w := embedding_unsupported(m))), None)
        if why is None:
            check_shared_factors(group)
        if why is None and head is not None and not head_targeted:
            why = f"tied to {head_name}, which the step leaves out, {fix}"
        if why is not None:
            ctx.float_layers[name] = why
            if head_targeted:
                rest.pop(head_name)
                ctx.float_layers[head_name] = f"tied to {name}, kept in float ({why})"
            continue
        bits, aspec = config.weight.bits, None
        small = token_table not in names  # positions, token types: tiny, added to every token
        if (head is not None or small) and config.first_last_bits is not None:
            bits = max(bits, config.first_last_bits)
        spec = embedding_spec(config.weight, emb.embedding_dim, bits)
        table = quantize_embedding_rtn(emb, spec)
        for n in names:  # one module under every name: the tie survives and is stored once
            set_module(model, n, table)
        if aliases[name]:
            ctx.notes.append(f"{', '.join(aliases[name])} share the codes of {name} (tied)")
        if head is not None:
            if config.act is not None:
                aspec = dataclasses.replace(
                    config.act, bits=max(config.act.bits, config.first_last_bits or 0)
                )
            set_module(model, head_name, tie_to_table(head, table, aspec))
            rest.pop(head_name)
            ctx.notes.append(f"{head_name} shares the codes of {name} (tied, stored once)")
        ctx.notes.append(f"embedding {name}: {table.format} (round-to-nearest)")
    return rest
