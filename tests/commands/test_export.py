"""``compactnn export``: --list, a verified GGUF file, and user errors without tracebacks."""

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.commands import export as export_cmd
from compactnn.commands._common import human_bytes
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import tiny_model

gguf = pytest.importorskip("gguf")
torch.set_num_threads(1)


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser.add_subparsers())
    return export_cmd.run(parser.parse_args(["export", *argv]))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    model, calib = tiny_model("llama")
    root = tmp_path_factory.mktemp("art")
    for recipe in ("w4-g32", "w4-g16"):
        qmodel = compactnn.compress(model, recipe, calib_data=calib, progress=False)
        compactnn.save(qmodel, root / recipe)
    return root, model


def test_list_says_which_formats_are_exact(artifacts, capsys):
    root, _ = artifacts
    assert _run(str(root / "w4-g32"), "--list") == 0
    out = capsys.readouterr().out
    assert "gguf                exact" in out
    assert _run(str(root / "w4-g16"), "--list") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("gguf"))
    assert "no:" in line and "w4-g32" in line


def test_export_gguf_writes_a_verified_file(artifacts, tmp_path, capsys):
    root, _ = artifacts
    out = tmp_path / "m.gguf"
    assert _run(str(root / "w4-g32"), "--format", "gguf", "--out", str(out)) == 0
    assert "verified" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    qmodel = compactnn.load(root / "w4-g32")
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    deq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    assert torch.equal(deq, qmodel.model.layers[1].mlp.down_proj.weight.detach())
    with pytest.raises(CompactnnError, match="--force"):
        _run(str(root / "w4-g32"), "--format", "gguf", "--out", str(out))
    assert _run(str(root / "w4-g32"), "--format", "gguf", "--out", str(out), "--force") == 0


def test_user_errors(artifacts, tmp_path):
    root, _ = artifacts
    with pytest.raises(CompactnnError, match="--list"):
        _run(str(root / "w4-g32"))
    with pytest.raises(CompactnnError, match="not a compactnn artifact"):
        _run(str(tmp_path), "--list")
    with pytest.raises(CompactnnError, match="w4-g32"):
        _run(str(root / "w4-g16"), "--format", "gguf", "--out", str(tmp_path / "x.gguf"))
    y = str(tmp_path / "y.gguf")
    with pytest.warns(UserWarning, match="max abs error"):
        assert _run(str(root / "w4-g16"), "--format", "gguf", "--out", y, "--requantize") == 0


def test_gguf_out_naming_a_folder_is_refused(artifacts, tmp_path):
    root, _ = artifacts
    missing = f"{tmp_path / 'dir_that_does_not_exist'}/"
    for out in (missing, str(tmp_path)):
        with pytest.raises(CompactnnError, match=r"names a folder.*model\.gguf"):
            _run(str(root / "w4-g32"), "--format", "gguf", "--out", out, "--force")
    assert not (tmp_path / "dir_that_does_not_exist").exists()
    nested = tmp_path / "not" / "yet" / "m.gguf"  # missing parent folders are created
    assert _run(str(root / "w4-g32"), "--format", "gguf", "--out", str(nested)) == 0
    assert nested.is_file()


def test_each_format_gets_its_options(artifacts, tmp_path, monkeypatch):
    root, _ = artifacts
    with pytest.raises(CompactnnError, match="onnx export does not take requantize"):
        _run(str(root / "w4-g32"), "-f", "onnx", "-o", str(tmp_path / "r"), "--requantize")
    seen = {}

    def fake_export(name, qmodel, out, *, force=False, **opts):
        seen[name] = opts
        Path(out).write_bytes(b"x")
        return Path(out)

    monkeypatch.setattr(export_cmd.formats, "export", fake_export)
    for fmt in ("onnx", "compressed-tensors", "gguf"):
        assert _run(str(root / "w4-g32"), "-f", fmt, "-o", str(tmp_path / fmt)) == 0
    ids = seen["onnx"]["example"]["input_ids"]
    assert ids.shape == (1, 16) and int(ids.max()) < 128  # the tiny Llama's vocabulary
    assert "tokenizer" not in seen["compressed-tensors"]  # none with save_pretrained here
    assert seen["gguf"] == {"requantize": False, "tokenizer": None}


FACTORY = """
import torch
from torch import nn
def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
"""


def test_own_cnn_artifacts_are_pointed_to_model_and_to_deploy_onnx(tmp_path, monkeypatch, capsys):
    (tmp_path / "export_cnn_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import export_cnn_factory

    model = export_cnn_factory.make().eval()
    save_file(model.state_dict(), "w.safetensors")
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    compactnn.save(compactnn.compress(model, "w8", calib_data=x, progress=False), "art")
    with pytest.raises(CompactnnError, match="--model MODULE:FUNCTION") as err:
        _run("art", "--list")
    assert "load(path, model" not in str(err.value)  # the CLI's words, not the Python call's
    own = ("--model", "export_cnn_factory:make", "--weights", "w.safetensors")
    assert _run("art", "--list", *own) == 0
    onnx = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("onnx"))
    assert "compactnn deploy art --model ... --onnx FILE" in onnx
    with pytest.raises(CompactnnError, match="--onnx FILE"):
        _run("art", "--format", "onnx", "--out", "m.onnx", *own)


def _user_error(capsys, *argv: str) -> str:
    """``compactnn export ARGV`` in-process: exit 2 with one ``error:`` line, no traceback."""
    code = main(["export", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_force_replaces_an_earlier_export_and_refuses_other_folders(artifacts, tmp_path, capsys):
    root, model = artifacts
    art = str(root / "w4-g32")
    (tmp_path / "file").write_text("x")
    err = _user_error(
        capsys, art, "-f", "compressed-tensors", "-o", str(tmp_path / "file"), "--force"
    )
    assert "--out" in err and "is a file" in err and "folder" in err
    sharded = tmp_path / "float"
    model.save_pretrained(sharded, max_shard_size="100KB")  # the user's sharded float model
    before = sorted(p.name for p in sharded.iterdir())
    capsys.readouterr()  # transformers' progress bar
    err = _user_error(capsys, art, "-f", "compressed-tensors", "-o", str(sharded), "--force")
    assert "not a compressed-tensors export" in err and "new or empty folder" in err
    assert sorted(p.name for p in sharded.iterdir()) == before
    ct = tmp_path / "ct"
    assert main(["export", art, "-f", "compressed-tensors", "-o", str(ct)]) == 0
    assert "--force" in _user_error(capsys, art, "-f", "compressed-tensors", "-o", str(ct))
    (ct / "model-00001-of-00002.safetensors").write_text("stale")  # not an export's file
    _user_error(capsys, art, "-f", "compressed-tensors", "-o", str(ct), "--force")
    (ct / "model-00001-of-00002.safetensors").unlink()
    assert main(["export", art, "-f", "compressed-tensors", "-o", str(ct), "--force"]) == 0
    files = sorted(p.name for p in ct.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    size = sum((ct / f).stat().st_size for f in files)
    assert f"{ct}  {human_bytes(size)}" in capsys.readouterr().out  # the new files only
    assert size < 0.5 * sum(p.stat().st_size for p in sharded.iterdir())


def test_tokenizer_option_errors_are_one_line(artifacts, tmp_path, capsys):
    root, _ = artifacts
    art = str(root / "w4-g32")
    (tmp_path / "calib.npy").write_bytes(b"\x93NUMPY\x01\x00\xff\xfe")
    out = str(tmp_path / "m.gguf")
    err = _user_error(
        capsys, art, "-f", "gguf", "-o", out, "--tokenizer", str(tmp_path / "calib.npy")
    )
    assert "--tokenizer" in err and "tokenizer.json" in err
    err = _user_error(capsys, art, "-f", "gguf", "-o", out, "--tokenizer", str(tmp_path))
    assert "no tokenizer.json there" in err
    onnx = str(tmp_path / "m.onnx")
    err = _user_error(capsys, art, "-f", "onnx", "-o", onnx, "--tokenizer", str(tmp_path))
    assert "--tokenizer is used by --format gguf and compressed-tensors" in err
    assert not any(p.suffix in (".gguf", ".onnx") for p in tmp_path.iterdir())


def test_compressed_tensors_takes_the_tokenizer_option(artifacts, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    root, _ = artifacts
    words = tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")
    tokenizers.Tokenizer(words).save(str(tmp_path / "tokenizer.json"))
    ct = tmp_path / "ct"
    argv = ["export", str(root / "w4-g32"), "-f", "compressed-tensors", "-o", str(ct)]
    assert main([*argv, "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    assert (ct / "tokenizer.json").is_file()  # written beside the model, not dropped


def test_a_deployed_artifact_lists_what_works_for_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "export_cnn_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import export_cnn_factory

    model = export_cnn_factory.make().eval()
    save_file(model.state_dict(), "w.safetensors")
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    qmodel = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    compactnn.save(compactnn.deploy(qmodel, "onednn", example=x), "dep")
    own = ("--model", "export_cnn_factory:make", "--weights", "w.safetensors")
    assert main(["export", "dep", "--list", *own]) == 0
    out = capsys.readouterr().out
    assert "dep is a deployed artifact" in out and "compactnn.load('dep', model=...)" in out
    onnx = next(x for x in out.splitlines() if x.strip().startswith("onnx"))
    assert "compactnn deploy dep " not in onnx  # deploy takes the compressed artifact
    assert "compressed artifact" in onnx and "dep was deployed from" in onnx
    err = _user_error(capsys, "dep", "--format", "onnx", "--out", "m.onnx", *own)
    assert "dep was deployed from" in err


@pytest.mark.parametrize(
    ("fmt", "out", "words"),
    [
        ("gguf", "hf/model.safetensors", "is inside the --model folder 'hf'"),
        ("gguf", "art/model.safetensors", "is inside the ARTIFACT folder 'art'"),
        ("gguf", "w.safetensors", "is the --weights file itself"),
        ("onnx", "hf", "is the --model folder itself"),
        ("onnx", "art", "is the ARTIFACT folder itself"),
        ("onnx", "hf/model.onnx", "is inside the --model folder 'hf'"),
        ("compressed-tensors", "art", "is the ARTIFACT folder itself"),
        ("gguf", "tok/tokenizer.json", "is the --tokenizer file itself"),
        ("compressed-tensors", "tok", "is a folder holding the --tokenizer input"),
    ],
)
def test_an_out_that_is_or_lies_in_an_input_is_refused_even_with_force(
    artifacts, tmp_path, monkeypatch, capsys, fmt, out, words
):
    root, model = artifacts
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "w4-g32", "art")
    model.save_pretrained("hf")
    save_file({"w": torch.ones(2)}, "w.safetensors")
    capsys.readouterr()

    def no_work(args):
        raise AssertionError("the artifact was loaded before the refusal")

    monkeypatch.setattr(export_cmd, "_load", no_work)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    inputs = ("--model", "hf", "--weights", "w.safetensors", "--tokenizer", "tok")
    err = _user_error(capsys, "art", "-f", fmt, "-o", out, *inputs, "--force")
    assert err.startswith(f"error: --out {out!r} {words}"), err
    assert "would replace or change an input of this command (--force or not)" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_list_says_exact_but_not_compressed_for_layers_onnx_keeps_float():
    from compactnn.export import onnx_hf

    model, calib = tiny_model("llama")
    q = compactnn.compress(model, "w4-g8", calib_data=calib, progress=False)
    line = next(x for x in export_cmd.list_formats(q) if x.strip().startswith("onnx"))
    assert line.split(None, 1)[1] == f"exact (but {onnx_hf.caveat(q)})"
    good = compactnn.compress(model, "w4-g16", calib_data=calib, progress=False)
    line = next(x for x in export_cmd.list_formats(good) if x.strip().startswith("onnx"))
    assert line.split() == ["onnx", "exact"]


def test_the_verified_line_does_not_claim_exactness_after_a_requantization():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("GGUF m.gguf: requantized 3 weights with no exact GGUF type", stacklevel=1)
    assert "within the error the warning gives" in export_cmd.verified_line(caught)
    assert export_cmd.verified_line([]) == "verified against compactnn's simulation"
