"""The layers a search prices: exactly those ``compactnn.compress`` quantizes, in execution order.

compress turns GPT-2 ``Conv1D`` layers into equal ``nn.Linear`` ones and splits
``nn.MultiheadAttention`` into called projections before any step runs; the search looks at
the same view (:func:`searched_model`). A Linear tied to an embedding table (an LM head) is
quantized by compress only together with its table (one set of codes under both names), so
the per-layer search leaves it out (:func:`tied_heads_left_out`) rather than claim bits for a
layer that compress then keeps in float.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from compactnn.core.attention import split_attention, splittable
from compactnn.core.calib import (
    as_batches,
    call_model,
    check_batch,
    detect_call_mode,
    model_dtype,
    to_dtype,
)
from compactnn.core.modules import (
    attention_out_projs,
    conv1d_to_linear,
    execution_order,
    is_hf_conv1d,
)
from compactnn.core.qembedding import tied_heads
from compactnn.core.qlayers import QUANTIZABLE
from compactnn.errors import CompactnnError
from compactnn.mixed_precision.formats import Format
from compactnn.quant.ends import model_ends, run_with_heads


def searched_model(model: nn.Module, formats: Sequence[Format]) -> nn.Module:
    """``model`` as compress quantizes it: a copy sharing its tensors whose GPT-2 ``Conv1D``
    layers are equal ``nn.Linear`` ones (:func:`~compactnn.core.modules.conv1d_to_linear`,
    as compress does first) and whose ``nn.MultiheadAttention`` modules are split into called
    ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linear layers
    (:func:`~compactnn.core.attention.split_attention`) unless a format prunes channels
    (compress splits no attention before channel pruning); ``model`` itself when neither
    applies. ``model`` is not changed."""
    convs = [n for n, m in model.named_modules() if n and is_hf_conv1d(m)]
    split = not any(f.prune for f in formats) and splittable(model)[0]
    if not convs and not split:
        return model
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, shared)  # new modules, the same tensors (ties kept)
    if convs:  # the new Linear layers hold transposed copies: the shared tensors stay
        conv1d_to_linear(view, convs)
    if split:  # the split layers hold copies: the shared tensors stay as they are
        split_attention(view)
    return view


def tied_heads_left_out(model: nn.Module, embeddings: str | None = None) -> dict[str, str]:
    """Linear layers tied to an embedding table: name -> why the search leaves it out and
    what compress does with it (quantized with its table by the ``embeddings`` step, or kept
    in float when ``embeddings`` is None)."""
    out = {}
    for table, (head, _) in tied_heads(model).items():
        done = (
            f"the embeddings step ({embeddings}) quantizes both, outside the budget"
            if embeddings is not None
            else "without embeddings= (--embeddings) both stay in float"
        )
        out[head] = (
            f"tied to the embedding table {table}: compress quantizes it only together with "
            f"that table, so the per-layer search leaves it out; {done}"
        )
    return out


def searched_layers(model: nn.Module, batches: list) -> dict[str, nn.Module]:
    """Quantizable layers (Linear, Conv1d, Conv2d) in execution order, less the ``out_proj``
    of each ``nn.MultiheadAttention`` (it reads that weight and never calls the layer:
    compress keeps it float; :func:`searched_model` splits the attentions it can) and less
    the heads tied to an embedding table (:func:`tied_heads_left_out`)."""
    unused = {*attention_out_projs(model), *tied_heads_left_out(model)}
    layers = {
        n: m
        for n, m in model.named_modules()
        if n and isinstance(m, QUANTIZABLE) and n not in unused
    }
    if not layers:
        raise CompactnnError("the model has no Linear/Conv1d/Conv2d layer to search over.")
    mode = detect_call_mode(model, batches[0])
    order = execution_order(model, list(layers), lambda m: call_model(m, batches[0], mode))
    return {n: layers[n] for n in order}


def end_layers(model: nn.Module, layers: dict[str, nn.Module], batches: list) -> set[str]:
    """The model's end layers as ``first_last_bits`` counts them
    (:func:`compactnn.quant.ends.model_ends`: the first and last to run, and every layer whose
    output is one of the model's outputs; a layer the first batch never reaches is none), so
    ``first_last_min_bits`` guards the same layers."""
    mode = detect_call_mode(model, batches[0])
    ran, heads = run_with_heads(model, list(layers), lambda m: call_model(m, batches[0], mode))
    return model_ends(list(layers), ran, heads)


def calib_batches(model: nn.Module, calib_data) -> list:
    """The calibration batches of a search, as compress takes them: at the model's float
    dtype (float64 from numpy cast, as compress casts it), the first one run once so data
    the model cannot take is refused in one line naming the expected input
    (:func:`compactnn.core.calib.check_batch`, compress's own check) before any layer is
    listed or scored."""
    batches = as_batches(calib_data)
    if not batches:
        raise CompactnnError("search needs calib_data (inputs from the training split).")
    if (dtype := model_dtype(model)) is not None:
        batches = [to_dtype(b, dtype) for b in batches]
    check_batch(model, batches[0], detect_call_mode(model, batches[0]))
    return batches
