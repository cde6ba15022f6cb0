"""TernaryBERT (Zhang et al., 2020): ternary weights, 8-bit activations, distilled without labels.

Weights are ternarised per output row with TWN's rule (the paper's row-wise variant)::

    delta_r = ratio * mean_j |w_rj|,   alpha_r = mean(|w_rj| : |w_rj| > delta_r)
    w_t[r, j] = alpha_r * sign(w_rj) * [|w_rj| > delta_r]

with straight-through gradients to the latent float weights; activations get 8-bit LSQ grids.
The student is trained on unlabeled calibration text to match the float teacher (a copy of
the model taken when the step starts) layer by layer:

    L = hidden * (sum_l MSE(H_l^S, H_l^T) + MSE(P^S, P^T)) + attention * sum_l MSE(A_l^S, A_l^T)
        + cosine * mean_b (1 - cos(pool(H_L^S)_b, pool(H_L^T)_b)) + logits * SCE(z^S, z^T)

``H_l`` the hidden states (embedding output included, padded tokens masked out), ``P`` the
output of the model's BERT pooler when it has one (its dense layer is ternarised too; read
from ``pooler_output``, or by a forward hook on the pooler when the model returns logits,
as ``BertForSequenceClassification`` does; the term is absent otherwise), ``z`` the model's
``logits`` when it returns them (a task head: the paper's prediction-layer term, the soft
cross-entropy ``-sum_c softmax(z^T)_c log softmax(z^S)_c`` minus the teacher's entropy, i.e.
``KL(p^T || p^S)``: the same gradient, 0 at a perfect match; per kept token for token logits;
MSE for a one-output regression head, whose softmax is constant), ``A_l`` the attention
probabilities of every layer and ``pool`` the mask-weighted mean over tokens (a sentence
encoder's output). Attention maps are read with eager attention while training;
the model is handed back with the attention implementation it came with.

The paper's ingredients: row-wise TWN ternary weights, 8-bit activations, hidden-state and
attention distillation, the logits term on a task head. Deviations and additions of ours
(each a config field):

* the logits term applies only where the model has a task head (an encoder alone has no
  logits); the cosine term on the pooled output (``cosine``), the model's real output for
  sentence embeddings, is ours. Decoder language models are refused (see
  ``_check_batches``), so no next-token logits term is needed;
* learned row scales (``learn_scale``): ``alpha_r`` is a trained parameter, TWN's value to
  start with, instead of being recomputed from the latent weights every step;
* the embedding tables are quantized round-to-nearest before training, not ternarised and
  trained: the token table at ``embedding_bits`` in groups of ``embedding_group`` (the
  table holds more weights than all the linear layers together, and 2 bits on it alone cost
  MiniLM 0.031 of cosine), positions and token types at 8 bits. The student learns around
  its quantized tables while the teacher keeps float ones;
* the attention term fits the softmax attention probabilities (what ``output_attentions``
  returns), where TinyBERT and TernaryBERT fit the unnormalised scores ``Q K^T / sqrt(d)``.

``compactnn.train`` takes the config for transformer classifiers only: a model with
convolutions (a CNN) is refused, as ``compress`` refuses it (for CNNs: ``w2a8-twn``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.context import CompressContext
from compactnn.core.device import check_device
from compactnn.core.modules import Targets
from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod, freeze_layers, init_quantizers, wrap_layers
from compactnn.engines.qat_quantizers import WeightExport, check_ternary_bits, fp16
from compactnn.errors import CompactnnError
from compactnn.quant.base import QuantConfig, quantize_embeddings, short_act_spec, short_weight_spec
from compactnn.registry import register


def row_ternary(w: torch.Tensor, ratio: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, alpha)``: codes in ``{-1, 0, 1}`` (``w``'s shape), one scale per row ``(R, 1)``."""
    w2 = w.detach().reshape(w.shape[0], -1)  # (R, K)
    delta = ratio * w2.abs().mean(1, keepdim=True)
    keep = w2.abs() > delta
    kept = keep.sum(1, keepdim=True).clamp(min=1)
    alpha = (w2.abs() * keep).sum(1, keepdim=True) / kept
    return (torch.sign(w2) * keep).reshape(w.shape), alpha


class RowTernaryWeight(nn.Module):
    """Row-wise ternary weights (TWN rule per row), straight-through to the float weights.

    With ``weight`` given, each row's scale is a trained parameter ``alpha`` (TWN's value at
    ``weight`` to start with) instead of being recomputed from the latent weights every step;
    its gradient is ``dL/dalpha_r = sum_j dL/dw_t[r, j] * codes[r, j]``.
    """

    spec = QuantSpec(bits=2, symmetric=True, granularity="channel")

    def __init__(self, ratio: float = 0.7, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ratio = ratio
        self.alpha = None if weight is None else nn.Parameter(row_ternary(weight, ratio)[1])

    def _codes_alpha(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, alpha = row_ternary(w, self.ratio)
        return codes, (alpha if self.alpha is None else self.alpha.abs())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, alpha = self._codes_alpha(w)
        shape = (-1,) + (1,) * (w.dim() - 1)
        if self.alpha is None:
            return w + (alpha.reshape(shape) * codes - w).detach()
        return alpha.reshape(shape) * codes + (w - w.detach())  # STE to w, exact to alpha

    def export(self, w: torch.Tensor) -> WeightExport:
        codes, alpha = self._codes_alpha(w)
        scale = fp16(alpha.detach().clamp(min=2.0**-14))  # (R, 1)
        return WeightExport(codes.to(torch.int8), scale, torch.zeros_like(scale), self.spec)


@dataclass(frozen=True)
class TernaryBERTConfig(QATConfig):
    """TernaryBERT settings; the defaults are ``w2a8-ternarybert``'s.

    Args:
        ratio: ternary threshold as a multiple of each row's mean |w| (0.7, TWN's).
        steps: distillation steps over the calibration batches (cycled). The default, 2400,
            is where MiniLM's held-out cosine crosses 0.95; it is long on a CPU (see
            ``device``).
        hidden: weight of the hidden-state term (and of the pooler-output term, when the
            model returns a ``pooler_output``).
        attention: weight of the attention-map term.
        logits: weight of the prediction term on the model's ``logits`` (a task head:
            soft cross-entropy to the teacher's, as KL; MSE for a one-output head; absent
            when the model returns no logits; 0: off).
        embeddings: also quantize the embedding tables (round-to-nearest, before training).
        embedding_bits: bits of the token table (None: the weight bits); position and token
            type tables (small, added to every token) take 8 bits.
        embedding_group: group size of the token table along the embedding dim (below 8 bits).
        cosine: weight of the sentence-embedding term ``1 - cos(pool(H_L^S), pool(H_L^T))``
            (mask-weighted mean of the last hidden states; 0: off).
        learn_scale: train each row's ternary scale (TWN's value to start with) instead of
            recomputing it from the latent weights.
        warmup: fraction of ``steps`` over which the learning rates rise linearly from 0
            before their cosine decay to 0 (0: cosine decay from the first step).
        device: run the distillation there (``"cuda"``, ``"cuda:1"``); the student, the
            teacher and each batch move there for the training steps, and the model comes
            back to its own device before it is frozen (None: where the model is).
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(2))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(8))
    first_last_bits: int | None = None  # the paper ternarises every layer
    lr: float = 5e-4  # MiniLM, 200 steps: cosine 0.8165 at 1e-4, 0.8765 at 5e-4, 0.8598 at 2e-3
    lr_quant: float = 1e-3
    ratio: float = 0.7
    # MiniLM, unlabeled_texts(), held out: 0.9184 / 0.9368 / 0.9472 / 0.9516 at 300 / 600 / 1200 /
    # 2400 steps (2400: seeds 0-2 all >= 0.9513); about 45 min on one CPU thread, 4 on a GPU
    steps: int = 2400
    hidden: float = 1.0
    attention: float = 1.0
    logits: float = 1.0
    embeddings: bool = True
    embedding_bits: int | None = 3  # 2 bits cost 0.031 of MiniLM's cosine, 3 bits 0.005
    embedding_group: int = 64
    cosine: float = 1.0
    learn_scale: bool = True
    warmup: float = 0.0
    device: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ternary_bits(self.weight.bits, "ternarybert")
        if not 0.0 < self.ratio < 2.0:
            raise CompactnnError(f"ratio={self.ratio} must lie in (0, 2); 0.7 is TWN's.")
        if self.steps < 0 or min(self.hidden, self.attention, self.cosine, self.logits) < 0:
            raise CompactnnError("steps, hidden, attention, cosine and logits must be >= 0.")
        if self.hidden == self.attention == self.cosine == self.logits == 0 and self.steps > 0:
            raise CompactnnError(
                "hidden, attention, cosine and logits are all 0: nothing to distil; "
                "set one of them > 0."
            )
        if self.embedding_bits is not None and not 2 <= self.embedding_bits <= 8:
            raise CompactnnError(f"embedding_bits={self.embedding_bits} must be 2..8 or None.")
        if not 0.0 <= self.warmup < 1.0:
            raise CompactnnError(f"warmup={self.warmup} must lie in [0, 1) (a fraction of steps).")
        if self.embedding_group < 1:
            raise CompactnnError(f"embedding_group={self.embedding_group} must be >= 1.")
        if self.device is not None:
            check_device(self.device)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference of hidden states ``(B, T, C)`` over the tokens ``mask`` keeps."""
    if mask is None:
        return F.mse_loss(a, b)
    m = mask.to(a.dtype).unsqueeze(-1)  # (B, T, 1)
    return ((a - b).pow(2) * m).sum() / (m.sum() * a.shape[-1]).clamp(min=1)


def pooled(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embeddings ``(B, C)``: the mean of ``hidden`` ``(B, T, C)`` over kept tokens."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def logits_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The prediction term: ``KL(softmax(t) || softmax(s))`` over the last dim (the soft
    cross-entropy less the teacher's constant entropy), averaged over rows, or over the tokens
    ``mask`` keeps for token logits ``(B, T, C)``; MSE for a one-output (regression) head."""
    if s.shape[-1] == 1:
        return F.mse_loss(s, t)
    log_t = F.log_softmax(t.detach().float(), -1)
    kl = (log_t.exp() * (log_t - F.log_softmax(s.float(), -1))).sum(-1)  # per row / token
    if mask is not None and kl.dim() == 2 and kl.shape == mask.shape:
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp(min=1)
    return kl.mean()


def distill_loss(student_out, teacher_out, mask, config: TernaryBERTConfig) -> torch.Tensor:
    """``hidden * (sum_l MSE(H_l) + MSE(P)) + attention * sum_l MSE(A_l) + cosine * (1 - cos)
    + logits * KL(z)`` (see the module docstring; ``P``: the pooler output and ``z`` the
    logits, each when both outputs have one)."""
    loss = student_out.hidden_states[0].new_zeros(())
    s, t = (getattr(o, "logits", None) for o in (student_out, teacher_out))
    if config.logits and s is not None and t is not None:
        loss = loss + config.logits * logits_loss(s, t, mask)
    if config.cosine:
        s, t = (pooled(o.hidden_states[-1], mask) for o in (student_out, teacher_out))
        loss = loss + config.cosine * (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if config.hidden:
        pairs = zip(student_out.hidden_states, teacher_out.hidden_states, strict=True)
        loss = loss + config.hidden * sum(masked_mse(s, t, mask) for s, t in pairs)
        s, t = (getattr(o, "pooler_output", None) for o in (student_out, teacher_out))
        if s is not None and t is not None:  # a BERT pooler: ternarised, seen by no other term
            loss = loss + config.hidden * F.mse_loss(s, t)
    if config.attention:
        pairs = zip(student_out.attentions, teacher_out.attentions, strict=True)
        loss = loss + config.attention * sum(F.mse_loss(s, t) for s, t in pairs)
    return loss


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def find_pooler(model: nn.Module) -> nn.Module | None:
    """The BERT pooler of ``model`` (``model.pooler`` or its base model's), or None."""
    for m in (model, getattr(model, "base_model", None)):
        pooler = getattr(m, "pooler", None)
        if isinstance(pooler, nn.Module):
            return pooler
    return None


def _call(model: nn.Module, batch: dict, attentions: bool = True) -> object:
    """The model's outputs with ``pooler_output`` set: a model that returns logits (a BERT
    classifier) does not return its pooler's output, so a forward hook on the pooler reads it."""
    pooler, box = find_pooler(model), []
    hook = None if pooler is None else pooler.register_forward_hook(lambda m, i, o: box.append(o))
    try:
        out = model(**batch, output_hidden_states=True, output_attentions=attentions)
    finally:
        if hook is not None:
            hook.remove()
    p = getattr(out, "pooler_output", None)
    return SimpleNamespace(
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        logits=getattr(out, "logits", None),
        pooler_output=p if p is not None or not box or not torch.is_tensor(box[-1]) else box[-1],
    )


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``steps``: a linear rise over the
    first ``w = round(warmup * steps)`` steps, then a cosine decay to 0::

        f(t) = (t + 1) / (w + 1)                              for t < w
        f(t) = (1 + cos(pi * (t - w) / (steps - w))) / 2      otherwise
    """
    w = round(warmup * steps)
    if step < w:
        return (step + 1) / (w + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(steps - w, 1)))


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder language model: it generates text (``can_generate()``)
    or an attention layer of it is causal (``is_causal``, as Llama's and GPT-2's are)."""
    can_generate = getattr(model, "can_generate", None)
    try:
        if callable(can_generate) and can_generate():
            return True
    except Exception:  # a model whose check itself fails: decided by its attention layers
        pass
    return any(getattr(m, "is_causal", None) is True for m in model.modules())


def _check_batches(model: nn.Module, ctx: CompressContext) -> None:
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise CompactnnError(
            "ternarybert distils a Hugging Face transformer's hidden states and attention maps: "
            "pass a transformers model (for CNNs use w2a8-twn)."
        )
    if is_causal_lm(model):  # before the copy and the (long) distillation
        raise CompactnnError(
            f"ternarybert is for BERT-style encoders (bidirectional attention), and "
            f"{type(model).__name__} is a decoder language model: compress it with a decoder "
            "recipe such as w4-g32-gptq or w8a8, or pass an encoder (e.g. minilm)."
        )
    if not ctx.batches or not all(isinstance(b, dict) for b in ctx.batches):
        raise CompactnnError(
            "ternarybert trains on unlabeled text: pass calib_data as tokenized batches "
            "(dicts with input_ids and attention_mask)."
        )


def distil(student: nn.Module, teacher: nn.Module, config: TernaryBERTConfig, ctx) -> list:
    """Train ``student`` (wrapped) against ``teacher`` for ``config.steps``; the losses."""
    quant = [p for n, p in student.named_parameters() if "quantizer" in n]
    ids = {id(p) for p in quant}
    weights = [p for p in student.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": weights, "lr": config.lr}]
    if quant and config.lr_quant > 0:
        groups.append({"params": quant, "lr": config.lr_quant})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, config.steps, config.warmup)
    )
    maps, losses = config.attention > 0, []
    device = next(student.parameters()).device
    for step in ctx.bar(range(config.steps), desc="ternarybert distillation"):
        batch = {k: _to(v, device) for k, v in ctx.batches[step % len(ctx.batches)].items()}
        with torch.no_grad():
            t = _call(teacher, batch, maps)
        loss = distill_loss(_call(student, batch, maps), t, batch.get("attention_mask"), config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def _tables(config: TernaryBERTConfig) -> QuantConfig:
    """The embedding tables' settings: the token table at ``embedding_bits`` in groups of
    ``embedding_group``, the small tables at 8 bits."""
    bits = config.embedding_bits or config.weight.bits
    grouped = dict(granularity="group", group_size=config.embedding_group) if bits < 8 else {}
    spec = QuantSpec(bits=bits, symmetric=bits == 8, **grouped)
    return QuantConfig(weight=spec, act=config.act, first_last_bits=8)


def _apply(model, targets, config: TernaryBERTConfig, ctx: CompressContext) -> nn.Module:
    _check_batches(model, ctx)
    implementation = model.config._attn_implementation
    teacher = copy.deepcopy(model).eval()
    if config.embeddings:
        quantize_embeddings(model, {}, Targets(classes=("Embedding",)), _tables(config), ctx)
    wrap_layers(model, targets, config, ctx, TERNARYBERT)
    init_quantizers(model, ctx)
    if config.attention > 0:
        for m in (model, teacher):
            m.set_attn_implementation("eager")  # attention maps are only returned by eager
    home = next(model.parameters()).device
    try:
        model.eval()  # no dropout: the teacher's and the student's states must line up
        if config.device is not None:
            device = check_device(config.device)
            model.to(device)
            teacher.to(device)
        with torch.enable_grad():
            losses = distil(model, teacher, config, ctx)
    finally:
        model.to(home)
        model.set_attn_implementation(implementation)
    freeze_layers(model, ctx)
    if losses:
        ctx.notes.append(
            f"ternarybert: {len(losses)} distillation steps, loss {losses[0]:.4g} -> "
            f"{sum(losses[-10:]) / len(losses[-10:]):.4g} (mean of the last 10)"
        )
    return model


def check_transformer_layers(layers: dict[str, nn.Module], config) -> None:
    """The engine's ``check_layers`` hook (``compactnn.train`` and ``compress``): refuse
    convolutions, as ``compress`` refuses a model that is not a transformer (a CNN)."""
    convs = [n for n, m in layers.items() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if convs:
        n = len(convs) - 1
        what = (
            f"{convs[0]!r} is a convolution" if n == 0
            else f"{convs[0]!r} and {n} more {'layer' if n == 1 else 'layers'} are convolutions"
        )  # fmt: skip
        raise CompactnnError(
            f"ternarybert ternarises a transformer's linear layers, and {what}: pass a "
            "transformers model (for CNNs use w2a8-twn)."
        )


@dataclass(frozen=True)
class _TernaryBERTMethod(QATMethod):
    """The training-aware hooks (``compactnn.train`` uses them) with TernaryBERT's own
    label-free distillation as the ``compress`` handler."""

    def __call__(self, model, targets, config, ctx):
        return _apply(model, targets, config, ctx)


TERNARYBERT = _TernaryBERTMethod(
    lambda layer, spec, cfg: RowTernaryWeight(
        cfg.ratio, layer.weight.detach() if cfg.learn_scale else None
    ),
    check_layers=check_transformer_layers,
)
register("ternarybert", TernaryBERTConfig, "TernaryBERT: ternary weights, a8, label-free KD")(
    TERNARYBERT
)
