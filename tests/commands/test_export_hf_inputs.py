"""``compactnn export`` of Hugging Face artifacts: image models (ViT) get an input built from
their config, --list says what the command can write, the float model folder's tokenizer and
processor files go into a compressed-tensors export, a W8A8 ONNX file says how to run it."""

from __future__ import annotations

import pytest
import torch

import compactnn
from compactnn.cli import main
from compactnn.commands import export as export_cmd

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
pytest.importorskip("onnxruntime")
torch.set_num_threads(1)

PATCH = "vit.embeddings.patch_embeddings.projection"


@pytest.fixture(scope="module")
def vit_artifact(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=128, num_labels=5,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=gen)} for _ in range(2)]
    q = compactnn.compress(model, "w4-g32", calib_data=calib, ignore=[PATCH], progress=False)
    root = tmp_path_factory.mktemp("vit") / "art"
    compactnn.save(q, root)
    return root


def test_a_vit_artifact_goes_to_the_formats_list_says(vit_artifact, tmp_path, capsys):
    art = str(vit_artifact)
    assert main(["export", art, "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(x.split() == ["compressed-tensors", "exact"] for x in lines)
    assert any(x.split() == ["onnx", "exact"] for x in lines)
    # ONNX was refused ("needs an example input"), compressed-tensors raised AttributeError
    assert main(["export", art, "-f", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", art, "-f", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "ct" / "config.json").is_file()


def test_list_says_no_where_the_command_cannot_build_an_input(vit_artifact):
    q = compactnn.load(vit_artifact)
    q.main_input_name = "input_features"  # an audio-like model: no ids, no image
    lines = {x.split()[0]: x for x in export_cmd.list_formats(q)}
    assert "no: ViTForImageClassification reads 'input_features'" in lines["compressed-tensors"]
    assert "no: --format onnx needs an example input" in lines["onnx"]  # was "exact"
    assert "export it from Python with example=" in lines["onnx"]


@pytest.fixture
def bert_folder(tmp_path):
    """A random BERT folder with its tokenizer files, as from_pretrained folders come."""
    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "tiny"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words + [f"w{i}" for i in range(120)]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "bert")
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_compressed_tensors_takes_the_source_folders_tokenizer(bert_folder, tmp_path, capsys):
    art, ct = tmp_path / "art", tmp_path / "ct"
    assert main(["compress", str(bert_folder), "-r", "w8", "-o", str(art), "--no-progress"]) == 0
    capsys.readouterr()
    model = ["--model", str(bert_folder.resolve())]  # named: an artifact's record is not read
    assert main(["export", str(art), "-f", "compressed-tensors", "-o", str(ct), *model]) == 0
    out = capsys.readouterr().out
    assert f"from {bert_folder.resolve()}" in out and "tokenizer.json" in out
    copied = sorted(p.name for p in bert_folder.iterdir() if p.name.startswith("tokenizer"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(copied)
    for name in copied:
        assert (ct / name).read_bytes() == (bert_folder / name).read_bytes()
    pipe = transformers.pipeline("feature-extraction", model=str(ct), device="cpu")
    assert torch.tensor(pipe("hello tiny world")).shape[-1] == 64  # was: no tokenizer
    # a later --force export replaces the copied files too (they are the export's own)
    argv = ["export", str(art), "-f", "compressed-tensors", "-o", str(ct), "--force", *model]
    assert main(argv) == 0


def test_a_w8a8_onnx_export_says_how_to_run_it(bert_folder, tmp_path, capsys):
    import numpy as np

    art, data = tmp_path / "art", tmp_path / "ids.npy"
    np.save(data, np.random.default_rng(0).integers(5, 128, (8, 16)))
    argv = ["compress", str(bert_folder), "-r", "w8a8", "-d", str(data), "-o", str(art)]
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["export", str(art), "-f", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "graph_optimization_level = ORT_ENABLE_BASIC" in out
