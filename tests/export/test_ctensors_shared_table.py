"""compressed-tensors export of a token table held under two names (T5's ``shared`` is also
``encoder.embed_tokens``): both load quantized, the codes are stored once."""

from __future__ import annotations

import pytest
import torch

import compactnn

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
safetensors = pytest.importorskip("safetensors.torch")
ctensors = pytest.importorskip("compactnn.export.ctensors")


def tiny_t5_encoder():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4
    )
    gen = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 128, (4, 16), generator=gen)} for _ in range(2)]
    return transformers.T5EncoderModel(config).eval(), calib


@pytest.mark.parametrize("recipe", ["w4-g32", "w8"])
def test_a_shared_token_table_reloads_as_the_simulation(recipe, tmp_path):
    model, calib = tiny_t5_encoder()
    q = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    assert q.shared is q.encoder.embed_tokens  # one quantized table, two names
    # was refused: "unexpected encoder.embed_tokens.weight_codes, ..."
    folder = ctensors.export(q, tmp_path / "ct")
    loaded = transformers.T5EncoderModel.from_pretrained(folder).eval()
    with torch.no_grad():
        sim = q(**calib[1]).last_hidden_state
        got = loaded(**calib[1]).last_hidden_state
    assert torch.equal(got, sim)
    state = safetensors.load_file(folder / "model.safetensors")
    assert "shared.weight" in state and "encoder.embed_tokens.weight" not in state  # tied
    assert torch.equal(state["encoder.embed_tokens.weight_scale"], state["shared.weight_scale"])
