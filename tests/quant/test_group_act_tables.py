"""``a8g`` recipes (activations per group at run time) quantize the token tables like
weight-only recipes do, tied heads included, and run on MatMulNBits with GatherBlockQuantized."""

from __future__ import annotations

import pytest
import torch

import compactnn
from compactnn.core.qembedding import QuantEmbedding
from compactnn.measure.size import artifact_bytes

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_a8g_quantizes_the_token_table(tmp_path, arch):
    from compactnn.models.tiny_hf import outputs, tiny_model

    model, calib = tiny_model(arch)
    q = compactnn.compress(model, "w4a8g-g32-gptq", calib_data=calib, progress=False)
    table = q.get_input_embeddings()
    assert isinstance(table, QuantEmbedding)
    if arch == "gpt2":  # the tied head reads the table's codes, activations per group
        assert q.lm_head.weight_codes.data_ptr() == table.weight_codes.data_ptr()
        assert q.lm_head.input_quantizer.is_group
    names = {"bert": ["embeddings.word_embeddings"], "gpt2": ["transformer.wte", "lm_head"]}
    kept = compactnn.compress(
        model, "w4a8g-g32-gptq", calib_data=calib, progress=False, ignore=names[arch]
    )
    compactnn.save(q, tmp_path / "q")
    compactnn.save(kept, tmp_path / "kept")
    float_table = table.weight.numel() * 4
    assert artifact_bytes(tmp_path / "kept") - artifact_bytes(tmp_path / "q") > float_table / 2
    fast = compactnn.to_ort_nbits(q, calib[0], threads=1)
    got, sim = fast(**calib[1])[0], outputs(q, calib[1])
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), sim.flatten(1)).min()
    assert cos > 0.999
