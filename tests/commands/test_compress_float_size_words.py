"""``compactnn compress``'s summary: the float size's reason keeps its whole advice, the
peak-memory lines say what they measure, and no temporary copy of the float model is made
(a missing TMPDIR changes nothing)."""

from __future__ import annotations

import tempfile

import torch
from safetensors.torch import save_file

import compactnn
from compactnn.commands import compress_sizes as sizes_cmd
from compactnn.commands._common import human_bytes
from compactnn.errors import CompactnnError
from compactnn.measure.size import artifact_bytes
from tests.commands._compress_cli import run_cli

ADVICE = (
    "cannot measure the float model's size on disk: its temporary copy in "
    f"'{'/very/long/temporary/folder' * 4}' could not be written (No space left on device): "
    "that folder's disk is full: free some space there, or set TMPDIR to a folder with room "
    "for it."
)


def test_the_reason_keeps_its_whole_advice(monkeypatch):
    assert len(ADVICE) > 200  # what first_line cut, mid-word ("or set TMPDI")

    def refuse(model):
        raise CompactnnError(ADVICE)

    monkeypatch.setattr(sizes_cmd, "float_artifact_bytes", refuse)
    assert sizes_cmd.float_size_or_reason(torch.nn.Linear(2, 2)) == ADVICE


def test_a_library_s_long_reason_is_cut_saying_so(monkeypatch):
    def fail(model):
        raise RuntimeError("y" * 5000 + "\nsecond line")

    monkeypatch.setattr(sizes_cmd, "float_artifact_bytes", fail)
    reason = sizes_cmd.float_size_or_reason(torch.nn.Linear(2, 2))
    assert reason.startswith("y" * 200) and reason.endswith(" more characters)")
    assert len(reason) < 1000 and "second line" not in reason


def test_the_peak_lines_say_the_peak_is_the_process_s_up_to_the_step_s_end():
    lines = sizes_cmd.peak_lines({"peak_rss_mib": {"gptq": 927.6, "awq": 12.0}})
    assert lines == [
        "  peak resident memory up to the end of gptq: 927.6 MiB (the whole process so far, "
        "model loading included; this run, not saved)",
        "  peak resident memory up to the end of awq: 12.0 MiB (the whole process so far, "
        "model loading included; this run, not saved)",
    ]
    assert sizes_cmd.peak_lines({}) == []


MODULE = """
import torch
from torch import nn
def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
"""


def test_compress_writes_no_temporary_copy_of_the_float_model(tmp_path, capsys, monkeypatch):
    (tmp_path / "fg_mod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fg_mod

    model = fg_mod.make().eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    missing = tmp_path / "no-tmp"
    monkeypatch.setenv("TMPDIR", str(missing))
    monkeypatch.setattr(tempfile, "tempdir", str(missing))  # any temporary file fails
    out = tmp_path / "out"
    argv = ["compress", "fg_mod:make", "--weights", str(tmp_path / "w.safetensors")]
    argv += ["-r", "w8a8", "-d", str(tmp_path / "x.safetensors"), "-o", str(out)]
    code, stdout, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 0, err
    monkeypatch.undo()
    compactnn.save(model, tmp_path / "float")
    expect = human_bytes(artifact_bytes(tmp_path / "float"))
    line = next(li for li in stdout.splitlines() if li.strip().startswith("artifact:"))
    assert f"(float artifact {expect}, " in line, line
    assert not missing.exists()
