"""``compactnn export``'s words: --force and its format, ONNX from a CNN, tokenizers, paths."""

import json

import pytest
import torch
from torch import nn

import compactnn
from compactnn.cli import main
from compactnn.commands import export as export_cmd

pytest.importorskip("gguf")
torch.set_num_threads(1)


def _error(capsys, *argv: str) -> str:
    """``compactnn export ARGV`` in-process: exit 2 with one ``error:`` line, no traceback."""
    code = main(["export", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from compactnn.models.tiny_hf import tiny_model

    model, calib = tiny_model("llama")
    root = tmp_path_factory.mktemp("hints")
    compactnn.save(compactnn.compress(model, "w8", calib_data=calib, progress=False), root / "w8")
    return str(root / "w8")


def test_force_does_not_replace_a_float_checkpoint_with_a_gguf(art, tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    ckpt.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    before = ckpt.read_bytes()
    err = _error(capsys, art, "--format", "gguf", "--out", str(ckpt), "--force")
    assert "is a safetensors file, not a GGUF file: --force replaces only an earlier" in err
    assert ckpt.read_bytes() == before
    out = tmp_path / "m.gguf"
    assert main(["export", art, "--format", "gguf", "--out", str(out)]) == 0
    assert main(["export", art, "--format", "gguf", "--out", str(out), "--force"]) == 0


def test_a_gguf_tokenizer_of_another_kind_is_refused_in_the_cli_words(art, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    err = _error(
        capsys, art, "-f", "gguf", "-o", str(tmp_path / "m.gguf"), "--tokenizer", str(tmp_path)
    )
    assert "WordPiece model" in err and f"Leave out --tokenizer {str(tmp_path)!r}" in err
    assert "tokenizer=None" not in err and not (tmp_path / "m.gguf").exists()


def test_onnx_into_a_folder_of_other_files_names_them(art, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    (tmp_path / "config.json").write_text("{}")
    assert main(["export", art, "--format", "onnx", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"written into the existing folder {tmp_path}, beside config.json" in out
    assert main(["export", art, "-f", "onnx", "-o", str(tmp_path / "new")]) == 0
    assert "existing folder" not in capsys.readouterr().out


def test_a_missing_artifact_is_said_to_be_missing(tmp_path, capsys):
    err = _error(capsys, str(tmp_path / "nonexistent"), "--list")
    assert "does not exist" in err and "not a compactnn artifact" not in err


def test_a_weight_only_cnn_is_told_deploy_needs_activation_quantization():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    w8 = compactnn.compress(model, "w8", calib_data=x, progress=False)
    line = next(x for x in export_cmd.list_formats(w8, "art", reference=True) if "onnx" in x)
    assert "`compactnn deploy art --onnx FILE`" in line  # a reference model: no --model
    assert "art quantizes weights only (recipe w8): compress with a recipe such as w8a8" in line
    a8 = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    line = next(x for x in export_cmd.list_formats(a8, "art") if "onnx" in x)
    assert "`compactnn deploy art --model ... --onnx FILE`" in line  # the user's own model
    assert "weights only" not in line


def test_the_output_names_the_tokenizer_it_embeds(art, tmp_path, capsys):
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()[:100],
        show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    argv = ["export", art, "-f", "gguf", "-o", str(tmp_path / "m.gguf")]
    assert main([*argv, "--tokenizer", str(tmp_path)]) == 0
    assert f"  with the tokenizer of --tokenizer {tmp_path} (in the file)\n" in (
        capsys.readouterr().out
    )
