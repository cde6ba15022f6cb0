"""Gemma's scaled token table (lookup * embed_scale) is quantized end to end."""

from __future__ import annotations

import pytest
import torch

import compactnn
from compactnn.core.qembedding import QuantEmbedding
from compactnn.models.tiny_hf import outputs

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [
        {"input_ids": torch.randint(3, 256, (4, 24), generator=gen),
         "attention_mask": torch.ones(4, 24, dtype=torch.long)}
        for _ in range(2)
    ]  # fmt: skip
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    return model, q, calib


def test_gemma_table_and_tied_head_are_quantized(gemma, tmp_path):
    model, q, calib = gemma
    table = q.get_submodule("model.embed_tokens")
    assert isinstance(table, QuantEmbedding) and float(table.embed_scale) == 64**0.5
    assert q.lm_head.weight_codes is table.weight_codes  # the tie survives, one set of codes
    ids = calib[1]["input_ids"]
    plain = torch.nn.functional.embedding(ids, table.weight)
    assert torch.equal(table(ids), plain * model.model.embed_tokens.embed_scale)
    sim, ref = outputs(q, calib[1]), outputs(model, calib[1])
    assert torch.nn.functional.cosine_similarity(sim, ref, dim=-1).mean() > 0.999
    path = tmp_path / "a"
    compactnn.save(q, path)
    tensors = safetensors.load_file(str(next(path.glob("*.safetensors"))))
    rows = [k for k, t in tensors.items() if t.is_floating_point() and t.shape == (256, 64)]
    assert rows == []  # no float table stored: the codes are
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored < sum(p.numel() * 4 for p in model.parameters()) / 3
    back = compactnn.load(path).eval()
    assert float(back.get_submodule("model.embed_tokens").embed_scale) == 64**0.5
    assert torch.equal(outputs(back, calib[1]), sim)
    kern = compactnn.to_kernels(back, dtype=torch.float32)
    assert type(kern.get_submodule("model.embed_tokens")).__name__ == "EmbeddingKernel"
    torch.testing.assert_close(outputs(kern, calib[1]), sim, rtol=1e-4, atol=1e-4)


def test_gemma_scaled_table_exports_to_onnx(gemma, tmp_path):
    onnx_hf = pytest.importorskip("compactnn.export.onnx_hf")
    pytest.importorskip("onnxruntime")
    _, q, calib = gemma
    path = onnx_hf.export(q, tmp_path / "m.onnx", example=calib[0])
    got = onnx_hf.ort_runner(path.read_bytes(), "nbits")(**calib[1])
    assert (got - outputs(q, calib[1])).abs().max() < 1e-4  # the factor is kept (Gather * s)
