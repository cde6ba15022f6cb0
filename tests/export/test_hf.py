"""Rebuilding Hugging Face skeletons from an artifact's header: encoder-decoder models (T5,
BART, Marian) save and load without the float model, and their tied token tables are stored
once and stay tied."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import compactnn
from compactnn.errors import ArtifactError
from compactnn.export.hf import HF_ARCHITECTURES, skeleton_from_header

tf = pytest.importorskip("transformers")

warnings.filterwarnings("ignore", message="kept in float")
warnings.filterwarnings("ignore", message=".*weight bytes stay in float")


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    config = tf.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16,
        vocab_size=100,
    )  # fmt: skip
    return tf.T5ForConditionalGeneration(config).eval()


TABLES = ("shared", "encoder.embed_tokens", "decoder.embed_tokens")


def seq2seq_batches(vocab: int = 100, n: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(4, vocab, (2, 8), generator=gen),
            "decoder_input_ids": torch.randint(4, vocab, (2, 5), generator=gen),
        }
        for _ in range(n)
    ]


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _compress(model, recipe, batches, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compactnn.compress(model, recipe, calib_data=batches, progress=False, **kw)


@pytest.mark.parametrize("recipe", ["w8a8", "w4-g32", "w4-g32-gptq"])
def test_t5_saves_and_loads_without_the_float_model(recipe, tmp_path):
    batches = seq2seq_batches()
    q = _compress(tiny_t5(), recipe, batches)
    compactnn.save(q, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a")  # rebuilt from the saved T5 config
    assert type(loaded).__name__ == "T5ForConditionalGeneration"
    for b in batches[:2]:
        torch.testing.assert_close(logits(loaded, b), logits(q, b), rtol=0, atol=0)


def _bart():
    config = tf.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=32,
    )  # fmt: skip
    return tf.BartForConditionalGeneration(config)


def _marian():
    config = tf.MarianConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=99,
        decoder_start_token_id=99,
    )  # fmt: skip
    return tf.MarianMTModel(config)


def _mt5():
    config = tf.MT5Config(
        d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16,
        vocab_size=100,
    )  # fmt: skip
    return tf.MT5ForConditionalGeneration(config)


@pytest.mark.parametrize("build", [_bart, _marian, _mt5])
def test_other_encoder_decoder_families_round_trip(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    assert type(model).__name__ in HF_ARCHITECTURES
    batches = seq2seq_batches(n=2)
    q = _compress(model, "w4-g32", batches)
    compactnn.save(q, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a")
    for b in batches:
        torch.testing.assert_close(logits(loaded, b), logits(q, b), rtol=0, atol=0)


def test_unlisted_architectures_are_still_refused(tmp_path):
    header = {"extra": {"hf": {"class": "EncoderDecoderModel", "config": {}}}}
    with pytest.raises(ArtifactError, match="not one compactnn rebuilds"):
        skeleton_from_header(tmp_path, header)
    header = {"extra": {"hf": {"class": "T5ForConditionalGeneration", "config": {}}}}
    with pytest.raises(ArtifactError, match="no valid 't5' config"):
        skeleton_from_header(tmp_path, header)


def _stored_keys(path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("recipe", ["w8a8", "w4-g32"])
def test_t5_tied_table_is_stored_once_and_stays_tied(recipe, tmp_path):
    model = tiny_t5()
    assert model.config.tie_word_embeddings
    batches = seq2seq_batches()
    q = _compress(model, recipe, batches)
    # one table under every name: the encoder, the decoder and the head read the same codes
    assert q.encoder.embed_tokens is q.shared and q.decoder.embed_tokens is q.shared
    assert q.lm_head.weight_codes is q.shared.weight_codes
    compactnn.save(q, tmp_path / "a")
    keys = _stored_keys(tmp_path / "a")
    tables = [k for k in keys if k.split(".weight")[0] in (*TABLES, "lm_head")]
    assert tables == ["shared.weight.packed", "shared.weight.scale"], tables
    header = json.loads((tmp_path / "a" / "compactnn.json").read_text())
    assert header["extra"]["shared_modules"] == {
        "encoder.embed_tokens": "shared",
        "decoder.embed_tokens": "shared",
    }
    loaded = compactnn.load(tmp_path / "a")
    ptr = loaded.shared.weight.data_ptr()
    assert loaded.encoder.embed_tokens.weight.data_ptr() == ptr
    assert loaded.decoder.embed_tokens.weight.data_ptr() == ptr
    assert loaded.lm_head.weight.data_ptr() == ptr
    for b in batches[:2]:
        torch.testing.assert_close(logits(loaded, b), logits(q, b), rtol=0, atol=0)


def test_float_tied_tables_stay_tied_after_load(tmp_path):
    """Tables a recipe leaves in float are stored once too (as tensor aliases)."""
    batches = seq2seq_batches()
    q = _compress(tiny_t5(), "w8a8", batches, ignore=["lm_head"])
    assert not hasattr(q.shared, "weight_codes")
    compactnn.save(q, tmp_path / "a")
    assert [k for k in _stored_keys(tmp_path / "a") if "embed" in k or "shared" in k] == [
        "shared.weight"
    ]
    loaded = compactnn.load(tmp_path / "a")
    ptr = loaded.shared.weight.data_ptr()
    for name in ("encoder.embed_tokens", "decoder.embed_tokens", "lm_head"):
        assert loaded.get_submodule(name).weight.data_ptr() == ptr
    torch.testing.assert_close(logits(loaded, batches[0]), logits(q, batches[0]), rtol=0, atol=0)


def test_an_edited_shared_module_entry_is_refused(tmp_path):
    q = _compress(tiny_t5(), "w4-g32", seq2seq_batches())
    compactnn.save(q, tmp_path / "a")
    path = tmp_path / "a" / "compactnn.json"
    from compactnn.export import validate

    for bad in ({"lm_head": "shared"}, {"encoder.final_layer_norm": "shared"}, []):
        header = json.loads(path.read_text())
        header["extra"]["shared_modules"] = bad
        header["digest"] = validate.header_digest(header)
        (tmp_path / "b").mkdir(exist_ok=True)
        for f in (tmp_path / "a").iterdir():
            (tmp_path / "b" / f.name).write_bytes(f.read_bytes())
        (tmp_path / "b" / "compactnn.json").write_text(json.dumps(header))
        with pytest.raises(ArtifactError, match=r"shared_modules|shared module"):
            compactnn.load(tmp_path / "b")


def test_tied_tables_load_onto_one_kernel(tmp_path):
    """``load(kernels=True)`` gives every name of a tied table the same kernel, as
    ``to_kernels`` does, with the same outputs."""
    torch.manual_seed(0)
    batches = seq2seq_batches(n=2)
    q = _compress(_marian().eval(), "w4-g32", batches)
    compactnn.save(q, tmp_path / "a")
    fast = compactnn.to_kernels(q)
    loaded = compactnn.load(tmp_path / "a", kernels=True)
    for m in (fast, loaded):
        tables = [m.get_submodule(f"model.{n}") for n in TABLES]
        assert type(tables[0]).__name__ == "EmbeddingKernel"
        assert all(t is tables[0] for t in tables)
    torch.testing.assert_close(logits(loaded, batches[0]), logits(fast, batches[0]), rtol=0, atol=0)
