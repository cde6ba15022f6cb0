"""GGUF export: block math against hand values and gguf's own dequantizer, the rotary row
permutation against Hugging Face's rotary embedding, and tiny Llama files read back with
``gguf.GGUFReader`` bit-exactly."""

import errno
import warnings

import numpy as np
import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export import gguf_blocks as gb
from compactnn.export.gguf import can_export, plan, tensor_bytes, write_gguf
from compactnn.models.tiny_hf import tiny_model
from compactnn.recipe import Recipe

gguf = pytest.importorskip("gguf")
torch.set_num_threads(1)

FULL = 1 + 2**-10  # a float16 with all significand bits: d * 3 is not float16-exact


def _dequant(blocks: gb.Blocks) -> torch.Tensor:
    qt = gguf.GGMLQuantizationType[blocks.ggml_type]
    return torch.from_numpy(np.array(gguf.quants.dequantize(blocks.data, qt)))


@pytest.mark.parametrize(
    ("lo", "hi", "d", "z", "want"),
    [
        (-8, 7, 0.5, 0, "Q4_0"),  # signed symmetric int4: c = q + 8
        (0, 15, 0.5, 3, "Q4_1"),  # uint4 with zero 3: m = -1.5 is float16-exact
        (0, 15, FULL, 3, "Q5_0"),  # m = -3 * FULL needs 12 bits: Q4_1 is not exact
        (0, 31, 0.5, 3, "Q5_1"),  # uint5, r up to 28: beyond Q5_0
        (0, 31, FULL, 3, "Q8_0"),  # uint5 with an inexact m
        (-128, 127, 0.25, 0, "Q8_0"),
    ],
)
def test_smallest_exact_type_reads_back_bit_exactly(lo, hi, d, z, want):
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(lo, hi + 1, (3, 64), generator=gen)
    q[0, :2] = torch.tensor([lo, hi])  # the whole range occurs
    scale = torch.full((3, 1), d) * torch.tensor([[1.0], [2.0], [0.25]])  # per row
    zero = torch.full((3, 1), float(z))
    grid = gb.block_grid(q, scale, zero, "channel", 0)
    blocks = gb.exact_blocks(*grid)
    assert blocks.ggml_type == want
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[want]
    assert blocks.data.shape == (3, 2 * block_bytes)
    want_w = (q.float() - zero) * scale  # compactnn's dequantize, by hand
    assert torch.equal(_dequant(blocks), want_w)


def test_block_layout_by_hand():
    # Q4_0: bytes 0-1 the float16 scale, then byte j = c[j] | c[j + 16] << 4
    q = torch.arange(32).reshape(1, 32) % 16 - 8
    blocks = gb.exact_blocks(q, torch.tensor([[2.0]]), torch.zeros(1, 1))
    raw = blocks.data[0]
    assert raw[:2].view(np.float16)[0] == 2.0
    c = (q[0] + 8).numpy()
    assert list(raw[2:]) == [int(c[j] | (c[j + 16] << 4)) for j in range(16)]


def test_groups_that_do_not_tile_blocks_are_refused():
    q = torch.zeros(2, 64, dtype=torch.int32)
    reason = gb.block_grid(q, torch.ones(2, 4), torch.zeros(2, 4), "group", 16)
    assert isinstance(reason, str) and "16" in reason
    assert isinstance(
        gb.block_grid(q[:, :48], torch.ones(2, 1), torch.zeros(2, 1), "channel", 0), str
    )
    bad_scale = torch.full((2, 1), 0.1)  # not float16-representable
    assert "float16" in gb.block_grid(q, bad_scale, torch.zeros(2, 1), "channel", 0)


def test_rope_permutation_turns_rotate_half_into_interleaved_rope():
    """llama.cpp's rope on adjacent pairs of the permuted rows equals the permuted rows of
    Hugging Face's rotate-half rope: the permutation is the only change the layout needs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, dim, pos = 2, 8, torch.arange(5.0)
    x = torch.randn(heads * dim, 5, generator=torch.Generator().manual_seed(3))  # rows x pos
    inv = 10000.0 ** (-torch.arange(0, dim, 2).float() / dim)  # (dim / 2,)
    ang = pos[:, None] * inv[None, :]  # (5, dim / 2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None]  # HF: (1, 5, dim), unsqueezed at 1
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None]
    hf_in = x.T.reshape(1, 5, heads, dim).transpose(1, 2)  # (1, heads, 5, dim)
    hf, _ = apply_rotary_pos_emb(hf_in, hf_in, cos, sin)
    hf_rows = hf.transpose(1, 2).reshape(5, heads * dim).T  # back to rows x pos
    p = gb.rope_permute(x, heads).T.reshape(5, heads, dim // 2, 2)  # adjacent pairs
    a, b = p[..., 0], p[..., 1]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    ggml = torch.stack([a * c - b * s, a * s + b * c], -1).reshape(5, heads * dim).T
    torch.testing.assert_close(ggml, gb.rope_permute(hf_rows, heads), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _read_back(path, qmodel):
    """Every tensor of the file against the model's dequantized weights, by gguf's reader."""
    reader = gguf.GGUFReader(str(path))
    cfg = qmodel.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj"}
    got = {t.name: t for t in reader.tensors}
    for i in range(cfg.num_hidden_layers):
        for short, mod in names.items():
            w = qmodel.get_submodule(f"model.layers.{i}.{mod}").weight.detach()
            t = got[f"blk.{i}.{short}.weight"]
            deq = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
            assert torch.equal(deq, gb.rope_permute(w, heads[short]))
    for name, mod in (("token_embd", "model.embed_tokens"), ("output", "lm_head")):
        t = got[f"{name}.weight"]
        deq = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        assert torch.equal(deq, qmodel.get_submodule(mod).weight.detach())
    return reader, got


SYM_W4 = """
name: w4-g32-sym
steps:
  - method: rtn
    config: {weight: {bits: 4, symmetric: true, granularity: group, group_size: 32}}
"""


@pytest.mark.parametrize(
    ("recipe", "types"),
    [("w4-g32", {"Q5_0", "Q8_0"}), (SYM_W4, {"Q4_0", "Q8_0"}), ("w8", {"Q8_0"})],
)
def test_tiny_llama_reads_back_bit_exactly(llama, tmp_path, recipe, types):
    model, calib = llama
    recipe = Recipe.from_yaml(recipe) if "\n" in recipe else recipe
    qmodel = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    report = write_gguf(qmodel, tmp_path)
    assert report.exact and report.path == tmp_path / "model.gguf"
    assert {t.ggml_type for t in report.tensors} - {"F32"} == types
    reader, got = _read_back(report.path, qmodel)
    assert all(torch.equal(v, qmodel.state_dict()[k]) for k, v in before.items())
    kv = {f.name: f for f in reader.fields.values()}
    assert bytes(kv["general.architecture"].parts[-1]).decode() == "llama"
    assert int(kv["llama.block_count"].parts[-1][0]) == 2
    assert int(kv["llama.attention.head_count_kv"].parts[-1][0]) == 2
    # the tensor payload is the theoretical size: elements x bits per weight
    assert sum(int(t.n_bytes) for t in got.values()) == report.tensor_bytes
    assert len(got) == 2 + 2 * 9 + 1  # embedding, output, norm, 2 blocks of 9


def test_no_exact_type_is_refused_with_nearest_recipe_or_requantized(llama, tmp_path):
    model, calib = llama
    qmodel = compactnn.compress(model, "w4-g16", calib_data=calib, progress=False)
    reason = can_export(qmodel)
    assert "w4-g32" in reason and "16" in reason
    with pytest.raises(CompactnnError, match="w4-g32"):
        write_gguf(qmodel, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    with pytest.warns(UserWarning, match="requantized 16 weights"):
        report = write_gguf(qmodel, tmp_path / "b.gguf", requantize=True)
    requant = [t for t in report.tensors if t.how == "requantized"]
    assert requant and all(report.max_diff[t.name] > 0 for t in requant)
    w = qmodel.model.layers[0].mlp.up_proj.weight.detach()
    err = report.max_diff["blk.0.ffn_up.weight"]
    assert err < 0.25 * float(w.abs().max())  # a 4-bit grid's error, not garbage


def test_refuses_what_llama_cpp_cannot_run(llama):
    model, calib = llama
    assert "Llama" in can_export(tiny_model("opt")[0])
    qmodel = compactnn.compress(model, "w8a8", calib_data=calib, progress=False)
    assert "activations" in can_export(qmodel)


def test_tokenizer_goes_into_metadata(llama, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100],
        show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat"] * 20, trainer)
    model, _ = llama
    report = write_gguf(model, tmp_path / "t.gguf", tokenizer=tok)  # a float model: all F32
    assert report.exact and set(report.types) == {"F32"}
    kv = gguf.GGUFReader(str(report.path)).fields
    tokens = [bytes(kv["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in kv["tokenizer.ggml.tokens"].data]  # fmt: skip
    assert len(tokens) == model.config.vocab_size  # padded up to the embedding rows
    assert tokens[: tok.get_vocab_size()] == [
        tok.id_to_token(i) for i in range(tok.get_vocab_size())
    ]
    types = [
        int(kv["tokenizer.ggml.token_type"].parts[i][0])
        for i in kv["tokenizer.ggml.token_type"].data
    ]
    assert types[:4] == [3, 3, 3, 1]
    assert int(kv["tokenizer.ggml.bos_token_id"].parts[-1][0]) == 1
    assert int(kv["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 2
    assert bytes(kv["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    merges = kv["tokenizer.ggml.merges"]
    assert len(merges.data) > 0 and " " in bytes(merges.parts[merges.data[0]]).decode()


def test_gguf_file_alone_computes_the_simulated_logits(llama, tmp_path, monkeypatch):
    """A float forward pass read only from the file (metadata, llama.cpp's pairwise rotary
    embedding) gives the simulated model's logits; without the q/k permutation it does not."""
    from compactnn.bench.export import gguf_forward

    model, calib = llama
    qmodel = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    ids = calib[0]["input_ids"][0]
    with torch.no_grad():
        want = qmodel(input_ids=ids[None]).logits[0]
        path = write_gguf(qmodel, tmp_path / "a.gguf").path
        torch.testing.assert_close(gguf_forward(path, ids), want, rtol=0, atol=1e-5)
        monkeypatch.setattr(gb, "rope_permute", lambda x, heads: x)
        path = write_gguf(qmodel, tmp_path / "b.gguf").path
        assert (gguf_forward(path, ids) - want).abs().max() > 1e-3


def test_missing_folders_are_created_and_a_trailing_separator_means_a_folder(llama, tmp_path):
    model, calib = llama
    qmodel = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    nested = tmp_path / "new" / "deeper" / "m.gguf"
    assert write_gguf(qmodel, nested).path == nested and nested.is_file()
    report = write_gguf(qmodel, f"{tmp_path / 'fresh'}/")
    assert report.path == tmp_path / "fresh" / "model.gguf" and report.path.is_file()


def test_an_existing_file_is_replaced_only_with_force(llama, tmp_path):
    model, calib = llama
    qmodel = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    user = tmp_path / "user.gguf"
    user.write_text("my own file\n")
    with pytest.raises(CompactnnError, match="exists; pass force=True"):
        write_gguf(qmodel, user)
    assert user.read_text() == "my own file\n"
    with pytest.raises(CompactnnError, match="not a GGUF file: force=True replaces only"):
        write_gguf(qmodel, user, force=True)
    user.write_bytes(b"GGUF\x03\x00\x00\x00")  # an earlier GGUF export: replaced
    assert write_gguf(qmodel, user, force=True).path == user
    assert gguf.GGUFReader(str(user)).tensors


def _odd_llama(hidden: int, intermediate: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
        num_attention_heads=6, num_key_value_heads=2, vocab_size=128,
        max_position_embeddings=64, head_dim=hidden // 6,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(("hidden", "intermediate", "floats"), [(72, 200, 9), (96, 200, 1)])
def test_requantize_warns_about_weights_left_f32(llama, tmp_path, hidden, intermediate, floats):
    """Rows that split into no block of 32 are written as their exact F32 values: not silent."""
    calib = [{"input_ids": b["input_ids"]} for b in llama[1][:1]]
    qmodel = compactnn.compress(_odd_llama(hidden, intermediate), "w8", calib_data=calib)
    reason = can_export(qmodel)
    assert f"{floats} weights have no exact GGUF type" in reason and "F32" in reason
    with pytest.warns(UserWarning, match=f"{floats} of 9 quantized weights are written as F32"):
        report = write_gguf(qmodel, tmp_path / "m.gguf", requantize=True)
    got = {t.name: t for t in gguf.GGUFReader(str(report.path)).tensors}
    down = got["blk.0.ffn_down.weight"]  # rows of 200: F32, compactnn's dequantized weight
    assert down.tensor_type == gguf.GGMLQuantizationType.F32
    want = qmodel.model.layers[0].mlp.down_proj.weight.detach()
    assert torch.equal(torch.from_numpy(np.array(down.data)).reshape(want.shape), want)
    f32 = [t for t in got.values() if t.tensor_type == gguf.GGMLQuantizationType.F32]
    assert len(f32) == floats + 3  # and the three norms
    assert report.exact  # every F32 weight reads back bit-identical
    if floats == 9:  # every quantized weight: the file holds 4 bytes per weight, say so
        assert report.file_bytes > 4 * sum(p.numel() for p in qmodel.parameters())
        with pytest.warns(UserWarning, match="the file is not compressed"):
            write_gguf(qmodel, tmp_path / "m.gguf", requantize=True, force=True)


def test_a_file_size_limit_reports_the_file_s_bytes_not_one_write_s(llama, tmp_path):
    """numpy's short write counts one tensor's bytes ("4032 of 4096 bytes written" for a
    file of 400 KB): the error names the bytes the file holds and what its tensors take."""
    resource = pytest.importorskip("resource")
    model, _ = llama
    out = tmp_path / "m.gguf"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(OSError) as err:
            write_gguf(model, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG and err.value.filename == str(out)
    payload = tensor_bytes(plan(model))
    assert err.value.strerror == (
        f"File too large (the file stopped at 20,000 bytes written; its tensors alone take "
        f"{payload:,})"
    )
    assert payload > 20_000 and not out.exists()


@pytest.mark.parametrize("window", [None, 16])
def test_a_mistral_decoder_is_written_as_llama_and_computes_its_logits(tmp_path, window):
    """MistralForCausalLM goes out as llama.cpp's llama architecture; a sliding window shorter
    than the positions caps the file's context length (full attention equals the window's)."""
    import transformers

    from compactnn.bench.export import gguf_forward

    config = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=window,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    qmodel = compactnn.compress(model, "w4-g32", calib_data=[{"input_ids": ids}], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_gguf(qmodel, tmp_path / "m.gguf").path
    capped = [w for w in caught if "the model's sliding window" in str(w.message)]
    assert len(capped) == (1 if window else 0)
    reader, _ = _read_back(path, qmodel)
    kv = reader.fields
    assert bytes(kv["general.architecture"].parts[-1]).decode() == "llama"
    assert int(kv["llama.context_length"].parts[-1][0]) == (window or 64)
    with torch.no_grad():
        want = qmodel(input_ids=ids[:1]).logits[0]
        torch.testing.assert_close(gguf_forward(path, ids[0]), want, rtol=0, atol=1e-5)
