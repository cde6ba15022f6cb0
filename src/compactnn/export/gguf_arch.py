"""Which Hugging Face decoders go to GGUF, as which llama.cpp architecture, and how.

======================  ===========  =================================================
Hugging Face            llama.cpp    what differs in the file
======================  ===========  =================================================
``LlamaForCausalLM``    ``llama``    q/k rows permuted to adjacent-pair rotary
``MistralForCausalLM``  ``llama``    as Llama; its sliding window caps the context
``Qwen2ForCausalLM``    ``qwen2``    q/k/v biases; rows as they are (NEOX rotary);
                                     sliding layers cap the context
======================  ===========  =================================================

llama.cpp's ``llama`` graph rotates adjacent pairs of each head, so the q/k rows (and their
biases) are permuted from Hugging Face's rotate-half layout, as llama.cpp's converter does.
Its ``qwen2`` graph uses NEOX rotary, which is Hugging Face's rotate-half: the rows are
written as they are. Neither graph has a sliding window: a model whose attention slides gets
the window as its context length (within it, attending to every earlier position equals the
window's attention). The metadata keys are prefixed with the architecture's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

#: a decoder block's Hugging Face module path -> llama.cpp's tensor name
LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@dataclasses.dataclass(frozen=True)
class Arch:
    """A llama.cpp architecture: its name (``general.architecture``, the key prefix) and
    whether q/k rows go from rotate-half to adjacent-pair rotary (``permute_qk``)."""

    name: str
    permute_qk: bool


#: Hugging Face ``model_type`` -> llama.cpp architecture (Mistral's decoder is Llama's)
ARCHS = {
    "llama": Arch("llama", True),
    "mistral": Arch("llama", True),
    "qwen2": Arch("qwen2", False),
}
CLASSES = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"


def arch_of(model: nn.Module) -> tuple[Arch | None, str | None]:
    """``(architecture, None)`` for a decoder that goes to GGUF, else ``(None, reason)``.

    Example:
        >>> arch_of(nn.Linear(2, 2))[1]
        "GGUF export covers Llama-family and Qwen2 decoders (...); this model is 'Linear'"
    """
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS or not hasattr(model, "lm_head"):
        return None, (
            f"GGUF export covers Llama-family and Qwen2 decoders ({CLASSES}); this model is "
            f"{kind or type(model).__name__!r}"
            + (" (export ARTIFACT --list names the formats it takes)" if config else "")
        )
    reason = config_reason(config)
    return (None, reason) if reason else (ARCHS[kind], None)


def config_reason(config: Any) -> str | None:
    """Why llama.cpp's graph would compute another model than ``config``'s, else None.

    Example:
        >>> from types import SimpleNamespace as C
        >>> config_reason(C(hidden_act="gelu"))
        "activation 'gelu' is not exported (llama.cpp's graph uses SwiGLU with silu)"
    """
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    if rope_type != "default":
        return f"rope scaling {rope_type!r} is not exported (default RoPE only)"
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        return f"activation {act!r} is not exported (llama.cpp's graph uses SwiGLU with silu)"
    if getattr(config, "mlp_bias", False):
        return "MLP biases (mlp_bias=True) are not exported: llama.cpp's graph has none"
    return None


def sliding_window(config: Any) -> int | None:
    """The attention window of a model whose attention slides (in some layer), else None.

    Qwen2 slides only with ``use_sliding_window`` and in the layers ``layer_types`` marks
    ``sliding_attention`` (from ``max_window_layers`` on); Mistral in every layer.

    Example:
        >>> from types import SimpleNamespace as C
        >>> sliding_window(C(sliding_window=1024))
        1024
        >>> sliding_window(C(sliding_window=1024, layer_types=["full_attention"]))
    """
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def context_length(config: Any) -> int:
    """The context written to the file: the model's positions, or its sliding window where
    that is shorter. llama.cpp attends to every earlier position, which equals the window's
    attention only while the context fits in the window.

    Example:
        >>> from types import SimpleNamespace as C
        >>> context_length(C(max_position_embeddings=4096, sliding_window=1024))
        1024
        >>> context_length(C(max_position_embeddings=4096, sliding_window=None))
        4096
    """
    window = sliding_window(config)
    positions = int(config.max_position_embeddings)
    return min(positions, window) if window else positions


def sources(model: nn.Module, arch: Arch) -> list[tuple[str, str, nn.Module | torch.Tensor, int]]:
    """``(gguf name, module name, module or tensor, rope heads or 0)`` in llama.cpp's order;
    rope heads are non-zero only for rows to permute (q and k of the ``llama`` graph)."""
    config = model.config
    out: list[tuple[str, str, Any, int]] = [
        ("token_embd.weight", "model.embed_tokens", model.model.embed_tokens, 0)
    ]
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    heads = {"attn_q": config.num_attention_heads, "attn_k": kv} if arch.permute_qk else {}
    for i, block in enumerate(model.model.layers):
        for path, short in LAYER.items():
            mod = block.get_submodule(path)
            src = f"model.layers.{i}.{path}"
            out.append((f"blk.{i}.{short}.weight", src, mod, heads.get(short, 0)))
            if getattr(mod, "bias", None) is not None and short.startswith("attn"):
                out.append((f"blk.{i}.{short}.bias", src + ".bias", mod.bias, heads.get(short, 0)))
    out.append(("output_norm.weight", "model.norm", model.model.norm, 0))
    if model.lm_head.weight is not model.model.embed_tokens.weight:  # tied: llama.cpp reuses
        out.append(("output.weight", "lm_head", model.lm_head, 0))  # token_embd
    return out


def add_hparams(writer: Any, config: Any, name: str) -> None:
    """The hyper-parameters of ``config`` as the writer's architecture's metadata keys."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
