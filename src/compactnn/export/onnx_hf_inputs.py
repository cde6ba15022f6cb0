"""The ``example=`` of an ONNX export of a Hugging Face model (:mod:`compactnn.export.onnx_hf`).

Checked as :func:`compactnn.to_ort_nbits` checks it, with the same words: a dict of keyword
tensors; integer token ids inside the vocabulary (float ids are refused by name before the
trace, not by torch's embedding lookup inside it: :func:`compactnn.core.tokens.check_token_ids`);
no key the model's ``forward`` does not take, and, once traced, no key the graph does not take
(``labels``: the exported graph returns the logits only, so the key would be dropped without a
word: :mod:`compactnn.kernels.ort_inputs`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compactnn.core.tokens import check_token_ids
from compactnn.errors import CompactnnError
from compactnn.kernels.ort_inputs import check_example_keys, check_graph_inputs

WHO = "ONNX export"


def check_example(model: nn.Module, example: Any) -> None:
    """Refuse an ``example`` the export cannot trace, before tracing it.

    Raises:
        CompactnnError: not a non-empty dict, float or out-of-vocabulary ``input_ids``, a
            mask of another shape, or a key ``model.forward`` does not take.
    """
    if not isinstance(example, dict) or not example:
        raise CompactnnError(
            f"{WHO} of a transformer needs example= a dict of keyword tensors "
            "(input_ids, attention_mask) from its tokenizer."
        )
    check_token_ids(model, example, f"{WHO}: example", resave=False)
    check_example_keys(model, example, WHO)


def check_graph(data: bytes, example: dict[str, Any]) -> None:
    """Refuse a key of ``example`` the exported graph (``data``) does not take (``labels``)."""
    import onnx

    check_graph_inputs(onnx.load_from_string(data).graph, example, WHO)
