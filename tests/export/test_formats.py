"""The export format table: names, lazy modules, option checks, and the gguf entry."""

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export import formats
from compactnn.models.tiny_hf import tiny_model

torch.set_num_threads(1)


def test_table_lists_the_three_formats():
    assert formats.NAMES == ("gguf", "compressed-tensors", "onnx")
    assert formats.get_format("gguf").module == "compactnn.export.gguf"
    with pytest.raises(CompactnnError, match="gguf, compressed-tensors, onnx"):
        formats.get_format("tflite")


def test_missing_format_module_is_a_reason_not_a_crash(monkeypatch):
    fake = formats.ExportFormat("nothing", "compactnn.export.not_there", "absent")
    monkeypatch.setattr(formats, "FORMATS", (*formats.FORMATS, fake))
    reason = formats.can_export("nothing", torch.nn.Linear(2, 2))
    assert "not available" in reason and "not_there" in reason
    with pytest.raises(CompactnnError, match="not available"):
        formats.export("nothing", torch.nn.Linear(2, 2), "x")


def test_gguf_entry_and_option_checks(tmp_path):
    model, calib = tiny_model("llama")
    qmodel = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    assert formats.can_export("gguf", qmodel) is None
    assert "Llama" in formats.can_export("gguf", torch.nn.Linear(2, 2))
    with pytest.raises(CompactnnError, match="does not take color"):
        formats.export("gguf", qmodel, tmp_path / "m.gguf", color="red")
    out = formats.export("gguf", qmodel, tmp_path / "m.gguf", requantize=False, tokenizer=None)
    assert out == tmp_path / "m.gguf" and out.stat().st_size > 0
    assert formats.capabilities(qmodel)["gguf"] is None


def test_existing_outputs_are_refused_without_force(tmp_path):
    for name, out in (("gguf", tmp_path / "user.gguf"), ("onnx", tmp_path / "user.onnx")):
        out.write_bytes(b"GGUF\x03\x00\x00\x00" if name == "gguf" else b"an old export\n")
        with pytest.raises(CompactnnError, match="exists; pass force=True"):
            formats.check_out(name, out)
        assert formats.check_out(name, out, force=True) == out
    assert formats.check_out("gguf", f"{tmp_path / 'new'}/") == tmp_path / "new" / "model.gguf"
    assert formats.check_out("onnx", tmp_path / "dir") == tmp_path / "dir" / "model.onnx"


def test_compressed_tensors_folder_of_other_files_is_refused_even_with_force(tmp_path):
    pytest.importorskip("compactnn.export.ctensors")
    float_ckpt = tmp_path / "float"
    float_ckpt.mkdir()
    (float_ckpt / "config.json").write_text('{"model_type": "llama"}')
    (float_ckpt / "model.safetensors").write_text("weights")
    for force in (False, True):
        with pytest.raises(CompactnnError, match=r"not a compressed-tensors export.*config\.json"):
            formats.check_out("compressed-tensors", float_ckpt, force=force)
    with pytest.raises(CompactnnError, match=r"is a file.*folder"):
        formats.check_out("compressed-tensors", float_ckpt / "model.safetensors", force=True)
    (tmp_path / "empty").mkdir()
    assert formats.check_out("compressed-tensors", tmp_path / "empty") == tmp_path / "empty"


def test_python_export_refuses_the_users_files(tmp_path):
    model, calib = tiny_model("llama")
    qmodel = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    user = tmp_path / "user.gguf"
    user.write_text("my own file\n")
    with pytest.raises(CompactnnError, match="exists; pass force=True"):
        formats.export("gguf", qmodel, user)
    assert user.read_text() == "my own file\n"
    with pytest.raises(CompactnnError, match="not a GGUF file: force=True replaces only"):
        formats.export("gguf", qmodel, user, force=True)
    assert user.read_text() == "my own file\n"
    user.write_bytes(b"GGUF\x03\x00\x00\x00")  # an earlier GGUF export: replaced
    assert formats.export("gguf", qmodel, user, force=True).stat().st_size > 1000
    pytest.importorskip("compressed_tensors")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)  # the user's float checkpoint
    before = (ckpt / "model.safetensors").read_bytes()
    for force in (False, True):
        with pytest.raises(CompactnnError, match="not a compressed-tensors export"):
            formats.export("compressed-tensors", qmodel, ckpt, force=force)
    assert (ckpt / "model.safetensors").read_bytes() == before
    ct = formats.export("compressed-tensors", qmodel, tmp_path / "ct")
    with pytest.raises(CompactnnError, match=r"holds a compressed-tensors export.*force"):
        formats.export("compressed-tensors", qmodel, ct)
    assert formats.export("compressed-tensors", qmodel, ct, force=True) == ct


@pytest.mark.parametrize("name", ["compressed-tensors", "gguf"])
def test_a_tokenizer_given_as_a_path_is_refused_before_any_work(tmp_path, name, monkeypatch):
    """A folder path reached save_pretrained of a str (AttributeError); a path is for the
    command line's --tokenizer, which checks the folder first."""
    monkeypatch.setattr(formats, "_module", lambda fmt: pytest.fail("worked before refusing"))
    with pytest.raises(CompactnnError, match="is a path: pass the tokenizer object"):
        formats.export(name, torch.nn.Linear(2, 2), tmp_path / "o", tokenizer=str(tmp_path))
    assert not (tmp_path / "o").exists()
