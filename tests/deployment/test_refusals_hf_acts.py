"""deploy refuses a Hugging Face transformer with quantized activations, naming where they run."""

from __future__ import annotations

import warnings

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*calibration samples")


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128,
    )  # fmt: skip
    ids = torch.randint(0, 100, (2, 8))
    return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": ids * 0 + 1}


@pytest.mark.parametrize(
    ("recipe", "words"),
    [
        ("w4a8g-g32", "per-group (a8g) or per-tensor (a8d) dynamic activations run on ONNX"),
        ("w8a8", "quantize activations on static grids"),
    ],
)
def test_the_refusal_names_the_runtime_of_its_activation_grid(recipe, words):
    model, batch = _bert()
    q = compactnn.compress(model, recipe, calib_data=[batch], progress=False)
    with pytest.raises(CompactnnError, match="cannot trace the Hugging Face BertModel") as info:
        compactnn.deploy(q, example=batch)
    assert words in str(info.value)
