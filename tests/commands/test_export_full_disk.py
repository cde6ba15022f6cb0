"""``compactnn export`` to a full disk: one ``error:`` line naming the output, no partial file.

A real full disk needs a tiny file system (an 8 KiB tmpfs gave these errors); here the writers
raise exactly what they raised there: numpy's short write inside the gguf writer
(``OSError("4352 requested and 608 written")``, no errno, no filename) and safetensors'
``SafetensorError`` carrying the OS error code 28.
"""

import re
from pathlib import Path

import pytest
import torch

import compactnn
from compactnn.cli import main
from compactnn.models.tiny_hf import tiny_model

gguf = pytest.importorskip("gguf")
safetensors = pytest.importorskip("safetensors")
torch.set_num_threads(1)

ENOSPC_RUST = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
    'left on device" })'
)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, calib = tiny_model("llama")
    root = tmp_path_factory.mktemp("art") / "lm-w4"
    compactnn.save(compactnn.compress(model, "w4-g32", calib_data=calib, progress=False), root)
    return root


def _one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("W")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_gguf_short_write_is_one_line_naming_the_file(artifact, tmp_path, monkeypatch, capsys):
    def short_write(self, *args, **kwargs):
        self.fout[0].write(b"GGUF partial")  # what fit before the disk filled up
        raise OSError("4352 requested and 608 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    out = tmp_path / "small" / "x.gguf"
    line = _one_error_line(capsys, ["export", str(artifact), "-f", "gguf", "-o", str(out)])
    assert repr(str(out)) in line
    # numpy's counts are of one write call, not of the file: the file's are said instead
    said = re.search(
        r"No space left on device \(the file stopped at ([\d,]+) bytes written; "
        r"its tensors alone take ([\d,]+)\)",
        line,
    )
    assert said is not None and "4352" not in line, line
    assert "free some disk space or choose another --out" in line
    assert _leftovers(out.parent) == []  # no partial file, no temporary file


def test_compressed_tensors_full_disk_is_one_line_naming_the_file(
    artifact, tmp_path, monkeypatch, capsys
):
    def full(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise safetensors.SafetensorError(ENOSPC_RUST)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "small" / "ct"
    argv = ["export", str(artifact), "-f", "compressed-tensors", "-o", str(out)]
    line = _one_error_line(capsys, argv)
    # named under --out, not the temporary folder the export is written in
    assert repr(str(out / "model.safetensors")) in line
    assert "No space left on device; free some disk space" in line
    assert _leftovers(out.parent) == []


def test_other_writer_errors_keep_their_traceback(artifact, tmp_path, monkeypatch):
    def bug(self, *args, **kwargs):
        raise OSError("something else")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", bug)
    out = tmp_path / "x.gguf"
    with pytest.raises(OSError, match="something else"):
        main(["export", str(artifact), "-f", "gguf", "-o", str(out)])
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(("fmt", "name"), [("gguf", "x.gguf"), ("compressed-tensors", "ct")])
def test_a_real_file_size_limit_is_one_line(artifact, tmp_path, capsys, fmt, name):
    """The real writers under ``ulimit -f 8`` (Python ignores SIGXFSZ: writes fail EFBIG)."""
    resource = pytest.importorskip("resource")
    out = tmp_path / "small" / name
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    try:
        line = _one_error_line(capsys, ["export", str(artifact), "-f", fmt, "-o", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    written = out if fmt == "gguf" else out / "model.safetensors"
    assert line.startswith(f"error: {str(written)!r}: File too large")
    assert "raise the limit or choose another path" in line
    assert _leftovers(out.parent) == []
