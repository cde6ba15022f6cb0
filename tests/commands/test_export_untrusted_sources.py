"""``compactnn export`` reads tokenizer files only from folders the user names, runs no
tokenizer code, and copies plain files only (security review, session 35): a forged
``extra.source.model`` is never read, a ``--tokenizer`` folder whose ``auto_map`` names code
is refused before anything runs, and a symbolic link or special file among the tokenizer
files is refused rather than followed into the export."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

import compactnn
from compactnn.cli import main
from compactnn.errors import CompactnnError
from compactnn.export import ct_folder

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
torch.set_num_threads(1)

SECRET = "SECRET_LINE_XYZ: not for any export\n"


def _error(capsys, *argv: str) -> str:
    """``compactnn ARGV`` in-process: exit 2 with one ``error:`` line, no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def _word_tokenizer(folder, token: str = "a") -> None:
    words = tokenizers.models.WordLevel({"[UNK]": 0, token: 1}, unk_token="[UNK]")
    tokenizers.Tokenizer(words).save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama saved as a float folder (with a tokenizer) and compressed (w8) into an
    artifact whose source record names that folder, as ``compactnn compress FOLDER`` makes."""
    from compactnn.models.tiny_hf import tiny_model

    root = tmp_path_factory.mktemp("untrusted")
    model, calib = tiny_model("llama")
    folder = root / "float"
    model.save_pretrained(folder)
    _word_tokenizer(folder, "SECRET_TOKEN_XYZ")
    (root / "secret.txt").write_text(SECRET)
    qmodel = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    extra = qmodel._compactnn.setdefault("extra", {})
    extra["source"] = {"kind": "Hugging Face directory", "model": str(folder)}
    compactnn.save(qmodel, root / "art")
    return root, folder, str(root / "art")


def _evil_tokenizer_folder(path, marker) -> None:
    path.mkdir()
    _word_tokenizer(path)
    (path / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTok(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = {"tokenizer_class": "EvilTok"}
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTok"]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_a_tokenizer_folder_with_code_is_refused_and_nothing_runs(
    setup, tmp_path, capsys, monkeypatch
):
    _, _, art = setup
    marker = tmp_path / "MARKER"
    _evil_tokenizer_folder(tmp_path / "tok", marker)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # transformers asked stdin
    out = tmp_path / "ct"
    err = _error(
        capsys, "export", art, "-f", "compressed-tensors", "-o", str(out),
        "--tokenizer", str(tmp_path / "tok"),
    )  # fmt: skip
    assert "auto_map" in err and "tokenization_evil.py" in err and "never runs" in err
    assert not marker.exists() and not out.exists()


def test_the_recorded_source_folder_is_not_read_unless_named(setup, tmp_path, capsys):
    _, folder, art = setup
    out = tmp_path / "ct"
    err = _error(capsys, "export", art, "-f", "compressed-tensors", "-o", str(out))
    assert f"--model {folder}" in err and "never names" in err and not out.exists()
    err = _error(capsys, "export", art, "-f", "gguf", "-o", str(tmp_path / "m.gguf"))
    assert f"--model {folder}" in err and not (tmp_path / "m.gguf").exists()
    assert main(["export", art, "--list"]) == 0  # lists formats: reads no tokenizer


def test_a_recorded_folder_that_is_gone_leaves_the_export_without_tokenizer(tmp_path, capsys):
    from compactnn.models.tiny_hf import tiny_model

    model, calib = tiny_model("llama")
    qmodel = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    gone = str(tmp_path / "no-such-folder")
    qmodel._compactnn.setdefault("extra", {})["source"] = {
        "kind": "Hugging Face directory", "model": gone,
    }  # fmt: skip
    compactnn.save(qmodel, tmp_path / "art")
    capsys.readouterr()
    out = tmp_path / "ct"
    assert main(["export", str(tmp_path / "art"), "-f", "compressed-tensors", "-o", str(out)]) == 0
    assert "no tokenizer written" in capsys.readouterr().out
    assert not any(p.name.startswith("tokenizer") for p in out.iterdir())


def test_a_linked_tokenizer_file_is_refused_and_plain_ones_are_copied(setup, tmp_path, capsys):
    root, folder, art = setup
    link = folder / "special_tokens_map.json"
    os.symlink(root / "secret.txt", link)
    out = tmp_path / "ct"
    try:
        argv = ["export", art, "-f", "compressed-tensors", "-o", str(out), "--model", str(folder)]
        err = _error(capsys, *argv)
        assert "special_tokens_map.json" in err and "symbolic link" in err and not out.exists()
    finally:
        link.unlink()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"with tokenizer.json from {folder}" in printed
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert SECRET not in "".join(p.read_text(errors="replace") for p in out.iterdir())


def test_gguf_reads_the_named_folders_tokenizer_only_as_a_plain_file(setup, tmp_path, capsys):
    root, folder, art = setup
    real = folder / "tokenizer.json"
    moved = root / "tokenizer.json"
    real.rename(moved)
    os.symlink(moved, real)
    try:
        argv = ["export", art, "-f", "gguf", "-o", str(tmp_path / "m.gguf"), "--model", str(folder)]
        err = _error(capsys, *argv)
        assert "tokenizer.json" in err and "symbolic link" in err
    finally:
        real.unlink()
        moved.rename(real)


def test_processor_files_refuse_links_and_special_files(tmp_path):
    _word_tokenizer(tmp_path)
    assert ct_folder.processor_files(tmp_path).names == ["tokenizer.json"]
    os.mkfifo(tmp_path / "vocab.txt")
    with pytest.raises(CompactnnError, match=r"vocab\.txt is not a regular file"):
        ct_folder.processor_files(tmp_path)
    os.unlink(tmp_path / "vocab.txt")
    os.symlink("/etc/hostname", tmp_path / "vocab.txt")
    with pytest.raises(CompactnnError, match=r"vocab\.txt is a symbolic link"):
        ct_folder.processor_files(tmp_path)


def test_a_file_swapped_for_a_link_after_listing_is_not_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _word_tokenizer(src)
    (tmp_path / "secret.txt").write_text(SECRET)
    files = ct_folder.processor_files(src)
    os.unlink(src / "tokenizer.json")
    os.symlink(tmp_path / "secret.txt", src / "tokenizer.json")
    with pytest.raises(CompactnnError):
        files.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()


class _CodeShippingTokenizer:
    """A tokenizer whose ``save_pretrained`` also writes code and a link (a custom class's
    ``save_pretrained`` copies its module; a library's could write anything)."""

    def save_pretrained(self, folder: str) -> None:
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write("{}")
        with open(os.path.join(folder, "tokenization_evil.py"), "w") as f:
            f.write("raise SystemExit")
        os.symlink("/etc/hostname", os.path.join(folder, "special_tokens_map.json"))


def test_a_saved_tokenizer_brings_no_code_and_no_links_into_the_folder(tmp_path):
    ct_folder.save_tokenizer(_CodeShippingTokenizer(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert (tmp_path / "tokenizer.json").read_text() == "{}"


def test_a_tokenizer_folder_with_a_linked_file_is_refused_before_transformers_reads_it(
    setup, tmp_path, capsys
):
    root, _, art = setup
    tok = tmp_path / "tok"
    tok.mkdir()
    _word_tokenizer(tok)
    (tok / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    os.symlink(root / "secret.txt", tok / "chat_template.jinja")  # read as a chat template
    out = tmp_path / "ct"
    err = _error(
        capsys, "export", art, "-f", "compressed-tensors", "-o", str(out), "--tokenizer", str(tok)
    )
    assert "chat_template.jinja is a symbolic link" in err and not out.exists()


def test_a_hugging_face_cache_snapshot_s_links_are_followed_and_others_are_not(tmp_path):
    from compactnn.export.ct_folder import cache_blob, read_plain

    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text('{"model_type": "llama"}')
    (snap / "tokenizer_config.json").symlink_to("../../blobs/f00d")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (snap / "special_tokens_map.json").symlink_to(secret)
    (repo / "blobs" / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(repo / "blobs" / "fifo")
    (snap / "vocab.txt").symlink_to("../../blobs/fifo")
    assert cache_blob(snap / "tokenizer_config.json") == repo / "blobs" / "f00d"
    assert read_plain(snap / "tokenizer_config.json") == b'{"model_type": "llama"}'
    for name in ("special_tokens_map.json", "vocab.txt"):
        assert cache_blob(snap / name) is None
        with pytest.raises(CompactnnError, match="symbolic link"):
            read_plain(snap / name)


def test_an_auto_map_naming_another_repository_s_code_says_so(tmp_path):
    from compactnn.commands.export_sources import tokenizer_code_refusal

    auto = {"AutoTokenizer": [None, "someorg/repo--tokenization_evil.EvilTok"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto}))
    said = str(tokenizer_code_refusal(tmp_path, "--tokenizer t"))
    assert "from another repository" in said and "folder's own" not in said
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"A": "t.T"}}))
    assert "from another repository" not in str(tokenizer_code_refusal(tmp_path, "x"))
