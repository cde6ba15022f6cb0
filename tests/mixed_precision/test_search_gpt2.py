"""search on GPT-2: its Conv1D layers are searched as compress quantizes them (as Linear), and
the LM head tied to the token table is left out of the per-layer search, never priced and
then kept in float."""

import pytest
import torch
from safetensors import safe_open

import compactnn
from compactnn.core.qembedding import QuantEmbedding, is_tied_to
from compactnn.core.qlayers import QuantLinear
from compactnn.mixed_precision import Budget, search

transformers = pytest.importorskip("transformers")

BLOCK = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
CONVS = [f"transformer.h.{i}.{n}" for i in range(2) for n in BLOCK]
FORMATS = "w4a8g-g32-gptq,w8a8g-g32-gptq,w2-g32-gptq"


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    cfg.bos_token_id = cfg.eos_token_id = None
    model = transformers.GPT2LMHeadModel(cfg).eval()
    calib = [
        {"input_ids": torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(i))}
        for i in range(2)
    ]
    return model, calib


def searched_bytes(path, layers):
    """Bytes of the searched layers' tensors (codes, scales, zeros, bias) in the artifact."""
    total = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            layer = key.split(".weight")[0].removesuffix(".bias")
            if layer in layers:
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


def test_conv1d_layers_are_searched_and_the_recipe_compresses_them(gpt2, tmp_path):
    model, calib = gpt2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="search left out lm_head: tied to the embedding table"):
        r = search(
            model, formats=FORMATS, budget=Budget(max_bytes=40000), calib_data=calib, progress=False
        )
    # before: {'lm_head': ...} alone, which compress then kept in float (1.01x larger)
    assert r.layers == CONVS and set(r.assignment) == set(CONVS)
    assert set(r.left_out) == {"lm_head"} and "stay in float" in r.left_out["lm_head"]
    assert r.to_dict()["left_out"] == r.left_out
    assert r.cost["bytes"] <= 40000
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n in CONVS)

    q = compactnn.compress(model, r.recipe, calib_data=calib, progress=False)
    kinds = {n: type(m) for n, m in q.named_modules()}
    assert all(kinds[n] is QuantLinear for n in CONVS)  # every searched layer quantized
    groups = {n: q.get_submodule(n).weight_spec.bits for n in CONVS}
    assert groups == {n: int(f[1]) for n, f in r.assignment.items()}
    compactnn.save(q, tmp_path / "art")
    # the predicted bytes are the artifact's, to the byte (a8g stores no activation grid)
    assert searched_bytes(tmp_path / "art", CONVS) == r.cost["bytes"]


def test_embeddings_quantize_the_tied_head_with_its_table(gpt2):
    model, calib = gpt2
    with pytest.warns(UserWarning, match=r"embeddings step \(w4-g32\) quantizes both"):
        r = search(
            model,
            formats="w2-g32-gptq,w4-g32-gptq",
            budget=Budget(avg_bits=3),
            calib_data=calib,
            embeddings="w4-g32",
            progress=False,
        )
    assert "lm_head" not in r.assignment
    q = compactnn.compress(model, r.recipe, calib_data=calib, progress=False)
    # before: the embeddings step left transformer.wte float (its tied head was not in it)
    assert isinstance(q.transformer.wte, QuantEmbedding)
    assert isinstance(q.lm_head, QuantLinear) and is_tied_to(q.lm_head, q.transformer.wte)
    assert "lm_head" not in compactnn.info_of(q)["float_layers"]
    x = calib[0]["input_ids"]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(
            q(input_ids=x).logits.flatten(), model(input_ids=x).logits.flatten(), dim=0
        )
    assert cos > 0.9


def test_embeddings_step_gives_the_tables_and_tied_head_the_asked_format(gpt2):
    model, calib = gpt2
    with pytest.warns(UserWarning):
        r = search(
            model,
            formats="w2-g32,w4-g32",
            budget=Budget(avg_bits=3),
            calib_data=calib,
            embeddings="w4-g32",
            progress=False,
        )
    assert r.recipe.steps[-1].config.first_last_bits is None
    q = compactnn.compress(model, r.recipe, calib_data=calib, progress=False)
    # before: the tied head counted as the last layer: wte and lm_head int8 per channel
    for m in (q.transformer.wte, q.lm_head):
        assert (m.weight_spec.bits, m.weight_spec.group_size) == (4, 32)
