"""GGUF export of Qwen2 decoders as llama.cpp's ``qwen2`` architecture: q/k/v biases,
rotate-half (NEOX) rotary with the rows unpermuted, ``qwen2.*`` keys, a tied head, sliding
layers, and the logits of a forward pass computed from the file alone
(``bench.export.gguf_forward``, which shares no math with the writer)."""

import warnings

import numpy as np
import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export import gguf_arch
from compactnn.export.gguf import can_export, write_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

IDS = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _qwen2(**overrides):
    """A tiny random Qwen2 (rope_theta 1e6 as the real ones) with non-zero q/k/v biases."""
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=1e6,
    )  # fmt: skip
    config = transformers.Qwen2Config(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # Hugging Face initializes biases to zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.5)
    return model


def _compress(model):
    calib = [{"input_ids": IDS}]
    return compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)


def _write(qmodel, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = write_gguf(qmodel, path)
    return report, [str(w.message) for w in caught]


def _field(reader, key):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0].name == "STRING" else v[0].item()


def _tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))


@pytest.mark.parametrize("tied", [False, True])
def test_a_qwen2_decoder_is_written_as_qwen2_and_computes_its_logits(tmp_path, tied):
    from compactnn.bench.export import gguf_forward

    qmodel = _compress(_qwen2(tie_word_embeddings=tied))
    assert (qmodel.lm_head.weight is qmodel.model.embed_tokens.weight) == tied
    report, caught = _write(qmodel, tmp_path / "m.gguf")
    assert report.exact and not caught
    reader = gguf.GGUFReader(str(report.path))
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.context_length") == 64
    assert _field(reader, "qwen2.rope.freq_base") == 1e6
    assert _field(reader, "qwen2.attention.head_count_kv") == 2
    assert not [k for k in reader.fields if k.startswith("llama.")]
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not tied)  # tied: llama.cpp uses token_embd
    assert {f"blk.1.attn_{x}.bias" for x in "qkv"} <= names
    assert "blk.1.attn_output.bias" not in names
    # NEOX rotary is Hugging Face's: q/k rows and biases are written as they are
    attn = qmodel.model.layers[1].self_attn
    assert torch.equal(_tensor(reader, "blk.1.attn_k.weight"), attn.k_proj.weight.detach())
    assert torch.equal(_tensor(reader, "blk.1.attn_q.bias"), attn.q_proj.bias.detach())
    with torch.no_grad():
        want = qmodel(input_ids=IDS[:1]).logits[0]
        torch.testing.assert_close(gguf_forward(report.path, IDS[0]), want, rtol=0, atol=1e-5)


def test_llama_s_row_permutation_would_compute_another_model(tmp_path, monkeypatch):
    """The file's layout matters: with the q/k rows permuted as for llama, the file computes
    other logits (the reference forward is sensitive to the layout it checks)."""
    from compactnn.bench.export import gguf_forward

    qmodel = _compress(_qwen2())
    monkeypatch.setitem(gguf_arch.ARCHS, "qwen2", gguf_arch.Arch("qwen2", True))
    path = write_gguf(qmodel, tmp_path / "m.gguf").path
    with torch.no_grad():
        want = qmodel(input_ids=IDS[:1]).logits[0]
        assert (gguf_forward(path, IDS[0]) - want).abs().max() > 1e-3


@pytest.mark.parametrize(("max_window_layers", "context"), [(1, 16), (2, 64)])
def test_sliding_layers_cap_the_context(tmp_path, max_window_layers, context):
    """Layers from max_window_layers on slide (use_sliding_window): the window becomes the
    context, with a warning; with no sliding layer the window does not matter."""
    from compactnn.bench.export import gguf_forward

    model = _qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=max_window_layers)
    qmodel = _compress(model)
    report, caught = _write(qmodel, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(report.path))
    assert _field(reader, "qwen2.context_length") == context
    capped = [m for m in caught if "the model's sliding window" in m]
    assert len(capped) == (context < 64)
    assert all("llama.cpp's qwen2 architecture" in m for m in capped)
    with torch.no_grad():  # 12 tokens fit in the window: the same logits
        want = qmodel(input_ids=IDS[:1]).logits[0]
        torch.testing.assert_close(gguf_forward(report.path, IDS[0]), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                              "original_max_position_embeddings": 16}}, "rope scaling 'yarn'"),
        ({"hidden_act": "gelu"}, "activation 'gelu' is not exported"),
    ],
)  # fmt: skip
def test_what_llama_cpp_s_qwen2_graph_does_not_compute_is_refused(tmp_path, overrides, match):
    qmodel = _compress(_qwen2(**overrides))
    assert match in can_export(qmodel)
    with pytest.raises(CompactnnError, match=match):
        write_gguf(qmodel, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_mlp_biases_are_refused_not_dropped():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=64, mlp_bias=True,
    )  # fmt: skip
    qmodel = _compress(transformers.LlamaForCausalLM(config).eval())
    assert "MLP biases (mlp_bias=True) are not exported" in can_export(qmodel)


def test_other_decoders_are_refused_naming_the_ones_taken():
    from compactnn.models.tiny_hf import tiny_model

    reason = can_export(tiny_model("opt")[0])
    assert "Qwen2ForCausalLM" in reason and "'opt'" in reason


# the split pattern of Qwen2's tokenizer.json (Split, "Isolated"), as Qwen publishes it
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bpe(split_regex):
    """A tiny byte-level BPE pre-tokenized as Qwen2's: a regex Split, then ByteLevel without
    its own regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=110,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:90],
        show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat 12 times"] * 20, trainer)
    return tok


def test_qwen2_s_tokenizer_is_written_with_llama_cpp_s_qwen2_pre_tokenizer(tmp_path):
    """llama.cpp names Qwen2's split "qwen2" (tokenizer.ggml.pre); another split regex before a
    regex-less ByteLevel is still refused (llama.cpp would split it differently)."""
    model = _qwen2()
    path = write_gguf(model, tmp_path / "m.gguf", tokenizer=_bpe(QWEN2_REGEX)).path
    reader = gguf.GGUFReader(str(path))
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    with pytest.raises(CompactnnError, match="use_regex=False"):
        write_gguf(model, tmp_path / "n.gguf", tokenizer=_bpe(r"\s+|\S+"))
