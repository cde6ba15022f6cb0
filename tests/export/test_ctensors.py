"""compressed-tensors export: plain transformers loads the folder as the simulated model."""

from __future__ import annotations

import json

import pytest
import torch

import compactnn
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import outputs, tiny_model
from compactnn.quant.rtn import RTNConfig
from compactnn.recipe import Recipe, Step

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
safetensors = pytest.importorskip("safetensors.torch")
ctensors = pytest.importorskip("compactnn.export.ctensors")


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return tiny_model("bert")


def _sym4() -> Recipe:
    spec = QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32)
    return Recipe("w4-g32-sym", (Step("rtn", RTNConfig(weight=spec)),))


def _reload(folder, causal: bool):
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return cls.from_pretrained(folder).eval()


def test_asymmetric_w4_bert_loads_as_the_simulation(bert, tmp_path):
    model, calib = bert
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    assert ctensors.can_export(q) is None
    folder = ctensors.export(q, tmp_path / "ct")
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    loaded = _reload(folder, causal=False)
    sim, got = outputs(q, calib[1]), outputs(loaded, calib[1])
    assert torch.allclose(got, sim, atol=1e-6, rtol=0)
    # a float model would differ by the quantization error: the folder holds the codes
    assert (outputs(model, calib[1]) - got).abs().max() > 1e-3
    state = safetensors.load_file(folder / "model.safetensors")
    zp = state["encoder.layer.1.attention.self.key.weight_zero_point"]
    layer = q.get_submodule("encoder.layer.1.attention.self.key")
    # uint4 codes/zero points move to the format's int4 grid: z' = z - 8
    assert torch.equal(zp.float(), layer.weight_zero - 8)


def test_symmetric_w4_llama_is_packed_and_decompresses_bit_exactly(tmp_path):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model, calib = tiny_model("llama")
    q = compactnn.compress(model, _sym4(), calib_data=calib, progress=False)
    folder = ctensors.export(q, tmp_path / "ct")
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = safetensors.load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    layer = q.get_submodule(name)
    group = next(g for g in qcfg["config_groups"].values() if f"re:^{name}$".replace(".", "[.]")
                 in g["targets"])  # fmt: skip
    assert group["format"] == "pack-quantized"
    assert state[f"{name}.weight_packed"].dtype == torch.int32
    assert state[f"{name}.weight_packed"].numel() * 32 == layer.weight.numel() * 4
    local = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
    scheme = QuantizationScheme(**{k: group[k] for k in ("targets", "weights", "format")})
    back = BaseCompressor.get_value_from_registry("pack-quantized").decompress(local, scheme)
    codes = layer.weight_codes.float().reshape(layer.out_features, -1, 32)  # (N, K/32, 32)
    ref = (codes * layer.weight_scale.unsqueeze(-1)).reshape(layer.weight.shape)
    assert torch.equal(back["weight"], ref)
    loaded = _reload(folder, causal=True)
    assert torch.equal(outputs(loaded, calib[1]), outputs(q, calib[1]))


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-smoothquant"])
def test_w8a8_activations_survive_the_round_trip(bert, recipe, tmp_path):
    model, calib = bert
    q = compactnn.compress(model, recipe, calib_data=calib * 4, progress=False)
    loaded = _reload(ctensors.export(q, tmp_path / "ct"), causal=False)
    sim, got = outputs(q, calib[1]), outputs(loaded, calib[1])
    cos = torch.nn.functional.cosine_similarity(sim.flatten(0, 1), got.flatten(0, 1), dim=-1)
    assert cos.mean() >= 0.9999
    assert (sim - got).abs().max() < 1e-4
    for m in q.modules():  # the same weights without activation quantization: further away
        if getattr(m, "input_quantizer", None) is not None:
            m.input_quantizer.enabled = False
    assert (outputs(q, calib[1]) - got).abs().max() > 10 * (sim - got).abs().max()


def test_refusals_name_the_problem(bert, tmp_path):
    model, calib = bert
    assert "Hugging Face" in ctensors.can_export(torch.nn.Linear(2, 2))
    q = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError, match="tokenizer="):
        ctensors.export(q, tmp_path / "x", shards=2)
    layer = q.get_submodule("encoder.layer.0.output.dense")
    layer.set_codebook(torch.linspace(-1, 1, 256).expand(*layer.weight_scale.shape, 256))
    reason = ctensors.can_export(q)
    assert "encoder.layer.0.output.dense" in reason and "compactnn.save" in reason
    with pytest.raises(CompactnnError, match="codebook"):
        ctensors.export(q, tmp_path / "y")
    assert not (tmp_path / "y").exists()
    assert "no quantized layer" in ctensors.can_export(compactnn.compress(model, "nm2:4"))


def test_force_replaces_an_earlier_export_and_nothing_else(bert, tmp_path):
    model, calib = bert
    q = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    tokenizers = pytest.importorskip("tokenizers")
    words = tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(words))
    folder = ctensors.export(q, tmp_path / "ct", tokenizer=tok)
    assert "tokenizer.json" in {p.name for p in folder.iterdir()}
    with pytest.raises(CompactnnError, match=r"holds a compressed-tensors export.*force"):
        ctensors.export(q, folder)
    ctensors.export(q, folder, force=True)  # no tokenizer this time: none is left behind
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no temporary folder left
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(CompactnnError, match=r"not a compressed-tensors export \(notes.txt\)"):
        ctensors.export(q, folder, force=True)
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_float_checkpoint_is_never_written_over(bert, tmp_path):
    model, calib = bert
    q = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    model.save_pretrained(tmp_path / "float")
    before = {p.name: p.read_bytes() for p in (tmp_path / "float").iterdir()}
    for force in (False, True):
        with pytest.raises(CompactnnError, match=r"not a compressed-tensors export.*new or empty"):
            ctensors.export(q, tmp_path / "float", force=force)
    assert {p.name: p.read_bytes() for p in (tmp_path / "float").iterdir()} == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(CompactnnError, match="is a file"):
        ctensors.export(q, tmp_path / "file", force=True)


@pytest.fixture(scope="module")
def gpt2_w4():
    model, calib = tiny_model("gpt2")
    q = compactnn.compress(model, "w4-g32", calib_data=calib, ignore=["lm_head"], progress=False)
    return q, calib


def test_gpt2_conv1d_layers_are_refused_before_anything_is_written(gpt2_w4, tmp_path):
    from compactnn.export import formats

    q, _ = gpt2_w4
    reason = ctensors.can_export(q)
    assert "transformer.h.0.attn.c_attn" in reason and "Conv1D" in reason
    assert "--format onnx" in reason and "compactnn.save" in reason
    assert formats.capabilities(q)["compressed-tensors"] == reason  # what --list prints
    with pytest.raises(CompactnnError, match="Conv1D"):
        ctensors.export(q, tmp_path / "ct")
    with pytest.raises(CompactnnError, match="Conv1D") as refused:
        q.save_pretrained(tmp_path / "sp")
    assert "w4-g128-gptq" not in str(refused.value)  # no recipe makes GPT-2 fit
    assert sorted(tmp_path.iterdir()) == []


def test_the_export_is_reloaded_by_transformers_before_it_is_kept(gpt2_w4, tmp_path, monkeypatch):
    # without the Conv1D refusal, the folder is written in nn.Linear layout: transformers'
    # GPT2LMHeadModel cannot load it, and the round trip says so before out exists
    q, _ = gpt2_w4
    monkeypatch.setattr(ctensors, "_conv1d_layers", lambda qmodel: [])
    with pytest.raises(CompactnnError, match=r"does not load.*c_attn\.weight"):
        ctensors.export(q, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_round_trip_compares_outputs_with_the_simulation(tmp_path, monkeypatch):
    model, calib = tiny_model("llama")
    q = compactnn.compress(model, _sym4(), calib_data=calib, progress=False)
    modes = [m.training for m in q.modules()]
    write = ctensors._write_folder
    ids = ctensors.probe_ids(q)
    sim = outputs(q, {"input_ids": ids})
    folder = ctensors.export(q, tmp_path / "good")
    assert ctensors.verify_folder(q, folder) == pytest.approx(1.0, abs=1e-6)
    got = outputs(_reload(folder, causal=True), {"input_ids": ids})
    assert torch.equal(got, sim)  # the probe the check runs, computed here independently

    def flipped(qmodel, state, qconfig, folder, tokenizer):  # a float tensor written wrong
        state = {**state, "model.norm.weight": -state["model.norm.weight"]}
        write(qmodel, state, qconfig, folder, tokenizer)

    monkeypatch.setattr(ctensors, "_write_folder", flipped)
    with pytest.raises(CompactnnError, match=r"mean cosine -1\.0+ to the simulated"):
        ctensors.export(q, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert [m.training for m in q.modules()] == modes  # the check's eval() is undone


def test_tied_embedding_refusal_names_the_cli_and_python_fix():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    q = compactnn.compress(model, "w8", calib_data=tiny_model("llama")[1][:1], progress=False)
    reason = ctensors.can_export(q)
    assert "tied" in reason and "--ignore lm_head" in reason and "ignore=['lm_head']" in reason


def test_a_tied_table_is_stored_once_and_reloads_tied(tmp_path):
    """OPT ties lm_head to the token table: the folder holds the table once, as
    save_pretrained does, and from_pretrained ties the head back to it."""
    model, calib = tiny_model("opt")
    q = compactnn.compress(model, "w4-g32", calib_data=calib, ignore=["lm_head"], progress=False)
    table = q.get_submodule("model.decoder.embed_tokens")
    assert q.lm_head.weight is table.weight and q.config.tie_word_embeddings
    folder = ctensors.export(q, tmp_path / "ct")
    state = safetensors.load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in state
    assert torch.equal(state["model.decoder.embed_tokens.weight"], table.weight.detach())
    loaded = _reload(folder, causal=True)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert torch.equal(loaded.lm_head.weight, table.weight.detach())
    assert torch.allclose(outputs(loaded, calib[1]), outputs(q, calib[1]), atol=1e-6, rtol=0)
    reference = {"model.decoder.embed_tokens.weight", "lm_head.weight"}  # what save_pretrained
    model.save_pretrained(tmp_path / "float")  # keeps of the tie: the table only
    kept = set(safetensors.load_file(tmp_path / "float" / "model.safetensors"))
    assert kept & reference == {"model.decoder.embed_tokens.weight"}


def test_a_scaled_token_table_keeps_its_factor(tmp_path):
    """Gemma's quantized table (lookup * embed_scale, not tied here) loads in transformers
    with its factor and gives the simulation's logits."""
    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _, calib = tiny_model("llama")
    q = compactnn.compress(model, "w4-g32", calib_data=calib[:1], progress=False)
    assert float(q.get_submodule("model.embed_tokens").embed_scale) == 8.0
    folder = ctensors.export(q, tmp_path / "ct")
    state = safetensors.load_file(folder / "model.safetensors")
    assert "model.embed_tokens.weight_scale" in state  # the table is stored as codes
    loaded = _reload(folder, causal=True)
    assert float(loaded.get_submodule("model.embed_tokens").embed_scale) == 8.0
    assert torch.allclose(outputs(loaded, calib[1]), outputs(q, calib[1]), atol=1e-6, rtol=0)
