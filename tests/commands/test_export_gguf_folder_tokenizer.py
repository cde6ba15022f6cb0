"""``compactnn export --format gguf`` without ``--tokenizer``: the ``--model`` folder's
byte-level BPE tokenizer.json is embedded (and the output says so); without a usable one the
output says the file holds token ids only and how to add a tokenizer."""

from __future__ import annotations

import pytest
import torch

from compactnn.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")
torch.set_num_threads(1)

TEXT = ["the tiny llama reads the tiny text", "hello world, hello llama"] * 20


def _byte_bpe(vocab_size: int) -> object:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"],
    )
    tok.train_from_iterator(TEXT, trainer)
    return tok


@pytest.fixture(scope="module")
def llama_artifacts(tmp_path_factory):
    """Artifacts compressed (w8) from Llama folders: with a byte-level BPE tokenizer.json,
    without any, and with a WordLevel one (which GGUF's gpt2 vocabulary cannot hold)."""
    root = tmp_path_factory.mktemp("gguf_tok")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    arts = {}
    for kind in ("bpe", "none", "words"):
        folder = root / f"llama-{kind}"
        model.save_pretrained(folder)
        if kind == "bpe":
            _byte_bpe(300).save(str(folder / "tokenizer.json"))
        elif kind == "words":
            words = tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")
            tokenizers.Tokenizer(words).save(str(folder / "tokenizer.json"))
        arts[kind] = root / f"art-{kind}"
        argv = ["compress", str(folder), "-r", "w8", "-o", str(arts[kind]), "--no-progress"]
        assert main(argv) == 0
    return root, arts


def _model_field(path) -> str:
    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.model"]
    return bytes(field.parts[field.data[0]]).decode()


def test_the_folders_tokenizer_is_embedded_and_said(llama_artifacts, tmp_path, capsys):
    root, arts = llama_artifacts
    capsys.readouterr()
    out = tmp_path / "m.gguf"
    model = str((root / "llama-bpe").resolve())  # named: an artifact's record is never read
    assert main(["export", str(arts["bpe"]), "-f", "gguf", "-o", str(out), "--model", model]) == 0
    printed = capsys.readouterr().out
    bpe = _byte_bpe(300)
    n = bpe.get_vocab_size()  # 286: the merges the text has
    assert f"with the tokenizer of {(root / 'llama-bpe').resolve()} ({n} tokens" in printed
    assert _model_field(out) == "gpt2"  # was no_vocab, silently
    reader = gguf.GGUFReader(str(out))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 320  # the tokenizer's, padded to the embedding's rows
    for i in (0, 258, n - 1):
        assert bytes(tokens.parts[tokens.data[i]]).decode() == bpe.id_to_token(i)


def test_without_a_usable_folder_tokenizer_the_output_says_token_ids_only(
    llama_artifacts, tmp_path, capsys
):
    root, arts = llama_artifacts
    capsys.readouterr()
    out = tmp_path / "none.gguf"
    model = ["--model", str(root / "llama-none")]
    assert main(["export", str(arts["none"]), "-f", "gguf", "-o", str(out), *model]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == (
        "  no tokenizer embedded (token ids only): pass --tokenizer DIR "
        "(a folder holding tokenizer.json)"
    )
    assert _model_field(out) == "no_vocab"
    out = tmp_path / "words.gguf"
    model = ["--model", str(root / "llama-words")]
    assert main(["export", str(arts["words"]), "-f", "gguf", "-o", str(out), *model]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("  no tokenizer embedded (token ids only): pass --tokenizer DIR (")
    assert "does not go into GGUF: GGUF export writes byte-level BPE vocabularies" in line
    assert _model_field(out) == "no_vocab"
