import warnings

import pytest
import torch
from safetensors.torch import load_file

import compactnn
from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import QuantLinear
from compactnn.export.size import artifact_size

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256)
    cfg.bos_token_id = cfg.eos_token_id = None
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def float_dir(gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("f") / "float"
    compactnn.save(gpt2, out)
    return out


CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_float_artifact_stores_the_tied_table_once(float_dir):
    stored = load_file(float_dir / "model.safetensors")
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored


@pytest.mark.parametrize(
    "recipe", ["w8a8", "w8a8-smoothquant", "w4-g32", "w4-g32-gptq", "w4-g32-awq"]
)
def test_every_conv1d_is_quantized_and_the_artifact_reloads_exactly(
    recipe, gpt2, ids, float_dir, tmp_path
):
    calib = [{"input_ids": ids[i : i + 2]} for i in (0, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration samples
        q = compactnn.compress(gpt2, recipe, calib_data=calib, progress=False)
    for i in range(2):
        for local in CONV1D:
            layer = q.get_submodule(f"transformer.h.{i}.{local}")
            assert isinstance(layer, QuantLinear), (recipe, local, type(layer).__name__)
    assert not any(type(m).__name__ == "Conv1D" for m in q.modules())
    assert isinstance(q.transformer.wte, QuantEmbedding)  # tied to lm_head: quantized with it
    assert q.lm_head.weight_codes is q.transformer.wte.weight_codes
    # activation recipes leave the untied position table float; weight-only ones quantize it
    kept = set() if "a" not in recipe.split("-")[0] else {"transformer.wpe"}
    assert set(q._compactnn["float_layers"]) == kept
    with torch.no_grad():  # still close to the float model (8-bit: close; 4-bit: related)
        f, c = gpt2(ids).logits, q(ids).logits
    cos = torch.nn.functional.cosine_similarity(f.flatten(), c.flatten(), dim=0)
    assert cos > (0.99 if recipe.startswith("w8") else 0.9)
    compactnn.save(q, tmp_path / "q")
    loaded = compactnn.load(tmp_path / "q")  # skeleton from the saved config: Conv1D again
    assert isinstance(loaded.transformer.h[0].attn.c_attn, QuantLinear)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, c)
    assert artifact_size(tmp_path / "q") < artifact_size(float_dir) * 0.6


def test_conv1d_becomes_an_equal_linear_even_when_ignored(gpt2, ids, tmp_path):
    q = compactnn.compress(gpt2, "w8", ignore=["transformer.h.0.mlp.c_fc"], progress=False)
    fc = q.transformer.h[0].mlp.c_fc
    assert type(fc) is torch.nn.Linear
    assert torch.equal(fc.weight, gpt2.transformer.h[0].mlp.c_fc.weight.T)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fc(x), gpt2.transformer.h[0].mlp.c_fc(x))
    compactnn.save(q, tmp_path / "q")
    loaded = compactnn.load(tmp_path / "q", model=gpt2)
    assert type(loaded.transformer.h[0].mlp.c_fc) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)


def test_to_kernels_runs_the_table_as_a_gather(gpt2, ids):
    q = compactnn.compress(gpt2, "w4-g32", progress=False)
    k = compactnn.to_kernels(q, dtype=torch.float32, fused=False)
    assert k._compactnn_kernels["swapped"]["transformer.wte"] == "EmbeddingKernel"
    assert not any(isinstance(m, QuantEmbedding) for m in k.modules())
    with torch.no_grad():
        torch.testing.assert_close(k(ids).logits, q(ids).logits, rtol=1e-4, atol=1e-4)
