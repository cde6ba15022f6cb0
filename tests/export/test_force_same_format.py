"""``force`` replaces only an earlier export of the same format; a float model is no GGUF."""

import json
import warnings

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export import formats
from compactnn.export.gguf_tokenizer import gpt2_vocab
from compactnn.models.tiny_hf import tiny_model

gguf = pytest.importorskip("gguf")
torch.set_num_threads(1)


def _safetensors(path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    return path


@pytest.fixture(scope="module")
def qllama():
    model, calib = tiny_model("llama")
    return model, compactnn.compress(model, "w8", calib_data=calib, progress=False)


@pytest.mark.parametrize(
    ("name", "content", "kind"),
    [
        ("mine.safetensors", None, "a safetensors file"),
        ("model.pt", b"PK\x03\x04rest of a zip", "a zip archive"),
        ("old.pkl", b"\x80\x04\x95pickle", "a pickle"),
        ("notes.gguf", b"my own file\n", "a file of unknown content"),
    ],
)
def test_force_refuses_a_file_that_is_no_gguf(tmp_path, name, content, kind):
    path = tmp_path / name
    _safetensors(path) if content is None else path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(CompactnnError) as err:
        formats.check_out("gguf", path, force=True, what="--out")
    msg = str(err.value)
    assert f"--out {str(path)!r} exists and is {kind}" in msg and "not a GGUF file" in msg
    assert "--force replaces only an earlier GGUF export" in msg and "\n" not in msg
    assert path.read_bytes() == before


def test_force_replaces_a_gguf_and_onnx_file_of_its_own_format(tmp_path):
    onnx = pytest.importorskip("onnx")
    old = tmp_path / "old.gguf"
    old.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))
    assert formats.check_out("gguf", old, force=True) == old
    # an ONNX model parses as one, whatever its name; a .onnx file of nothing recognisable too
    graph = onnx.helper.make_graph([], "g", [], [])
    model = tmp_path / "model.bin"
    onnx.save(onnx.helper.make_model(graph), model)
    assert formats.replace_reason("onnx", model) is None
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert formats.replace_reason("onnx", tmp_path / "empty.onnx") is None
    # but a GGUF, a safetensors or a JSON file is not replaced by an ONNX export
    (tmp_path / "g.onnx").write_bytes(old.read_bytes())
    assert "is a GGUF file, not an ONNX file" in formats.replace_reason("onnx", tmp_path / "g.onnx")
    ckpt = _safetensors(tmp_path / "w.onnx")
    with pytest.raises(CompactnnError, match="is a safetensors file, not an ONNX file: force=True"):
        formats.check_out("onnx", ckpt, force=True)
    with pytest.raises(CompactnnError, match="on its path is a file"):  # onnx: a folder name
        formats.check_out("onnx", _safetensors(tmp_path / "x.safetensors"), force=True)


def test_python_export_with_force_keeps_the_users_checkpoint(qllama, tmp_path):
    _, qmodel = qllama
    ckpt = _safetensors(tmp_path / "model.safetensors")
    before = ckpt.read_bytes()
    with pytest.raises(CompactnnError, match="is a safetensors file, not a GGUF file"):
        formats.export("gguf", qmodel, ckpt, force=True)
    from compactnn.export.gguf import write_gguf  # the lower-level writer too

    with pytest.raises(CompactnnError, match="is a safetensors file, not a GGUF file"):
        write_gguf(qmodel, ckpt, force=True)
    assert ckpt.read_bytes() == before
    out = formats.export("gguf", qmodel, tmp_path / "m.gguf")
    assert formats.export("gguf", qmodel, out, force=True) == out  # an earlier GGUF: replaced
    assert gguf.GGUFReader(str(out)).tensors


def test_a_float_model_is_refused_not_written_all_f32(qllama, tmp_path):
    model, _ = qllama
    reason = formats.can_export("gguf", model)
    assert reason is not None and "needs a compressed model" in reason and "F32" in reason
    with pytest.raises(CompactnnError, match="has no quantized weight"):
        formats.export("gguf", model, tmp_path / "float.gguf")
    assert not (tmp_path / "float.gguf").exists()


def test_a_wordpiece_tokenizer_is_refused_with_the_callers_fix():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "the": 1, "cat": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    with pytest.raises(CompactnnError, match=r"WordPiece.*\. Pass tokenizer=None to write"):
        gpt2_vocab(tok)
    with pytest.raises(CompactnnError, match="Leave out --tokenizer 'x' to write"):
        gpt2_vocab(tok, fix="leave out --tokenizer 'x' to write the model without a vocabulary")


def test_python_compressed_tensors_export_warns_when_it_writes_no_tokenizer(qllama, tmp_path):
    pytest.importorskip("compressed_tensors")
    _, qmodel = qllama
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = formats.export("compressed-tensors", qmodel, tmp_path / "ct")
    said = [str(w.message) for w in caught if "no tokenizer" in str(w.message)]
    assert len(said) == 1 and str(out) in said[0] and "tokenizer=" in said[0]
    assert not (out / "tokenizer.json").exists()
