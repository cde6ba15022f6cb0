"""``export_dynamic`` declares an output's axis 1 as the sequence only when it follows the
sequence length: a classifier's ``(batch, num_labels)`` logits keep ``num_labels`` fixed, a
hidden state's ``(batch, seq, hidden)`` keeps its dynamic sequence."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from compactnn.core.onnx_trace import export_dynamic

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


def _config(**kw) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, **kw,
    )  # fmt: skip


def _exported(model, seq: int) -> tuple[list, ort.InferenceSession]:
    g = torch.Generator().manual_seed(1)
    example = {
        "input_ids": torch.randint(0, 50, (2, seq), generator=g),
        "attention_mask": torch.ones(2, seq, dtype=torch.long),
    }
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_dynamic(model, example, buf)
    out = onnx.load_from_string(buf.getvalue()).graph.output[0]
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    return dims, ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])


def _run(session, batch: int, seq: int) -> tuple:
    feed = {i.name: np.ones((batch, seq), np.int64) for i in session.get_inputs()}
    return session.run(None, feed)[0].shape


@pytest.mark.parametrize("num_labels", [3, 7])  # 7: as many labels as the example's tokens
def test_classifier_logits_keep_num_labels(num_labels):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config(num_labels=num_labels)).eval()
    dims, session = _exported(model, seq=7)
    assert dims == ["batch", num_labels]
    assert _run(session, 3, 5) == (3, num_labels)  # what the declared shape says


def test_hidden_states_keep_the_dynamic_sequence():
    torch.manual_seed(0)
    dims, session = _exported(transformers.BertModel(_config()).eval(), seq=7)
    assert dims == ["batch", "seq", 32]
    assert _run(session, 3, 5) == (3, 5, 32)
