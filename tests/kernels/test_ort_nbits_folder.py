"""The private folder of to_ort_nbits (no ``path=``) on a build server: removed at exit when
the application turns SIGTERM into ``sys.exit`` (as the ``compactnn`` command does); left by
a process killed outright (SIGKILL, or SIGTERM with no handler: Python runs nothing then), and
then removed by the next ``to_ort_nbits`` in the same temporary folder, never while its
process lives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from compactnn.kernels.ort_nbits import to_ort_nbits
from tests.kernels._keywords import compressed

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.filterwarnings("ignore:to_ort_nbits. accuracy_level=4"),
    pytest.mark.filterwarnings("ignore:RTNConfig. the first/last-layer rule"),
]

CHILD = """
import signal, sys, time, warnings
warnings.simplefilter("ignore")
import compactnn
from compactnn.models.tiny_hf import tiny_model
if sys.argv[1] == "exit":  # what an application does: SIGTERM becomes a clean exit
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
model, calib = tiny_model("bert")
q = compactnn.compress(model, "w4-g32", calib_data=calib[:1], progress=False)
fast = compactnn.to_ort_nbits(q, calib[0], accuracy_level=0, threads=1)
print(fast.path.parent, flush=True)
time.sleep(300)
"""


def _start(tmp: Path, mode: str) -> subprocess.Popen:
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _folder(proc: subprocess.Popen) -> Path:
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        pytest.fail(f"the child failed: {proc.communicate()[1][-2000:]}")
    return Path(line)


def _ours(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("compactnn-nbits-*"))


@pytest.mark.slow
def test_sigterm_leaves_no_private_folder_behind(tmp_path, monkeypatch):
    exiting, killed = tmp_path / "a", tmp_path / "b"
    procs = [_start(exiting, "exit"), _start(killed, "default")]  # both at once: 2x faster
    try:
        folders = [_folder(p) for p in procs]
        assert [f.parent for f in folders] == [exiting, killed]
        assert all((f / "model.onnx").is_file() for f in folders)
        # another process's to_ort_nbits in the same TMPDIR leaves a live one's folder alone
        q, batch = compressed("w4-g32")
        monkeypatch.setattr(tempfile, "tempdir", str(exiting))
        mine = to_ort_nbits(q, batch, accuracy_level=0, threads=1)
        assert folders[0].is_dir() and mine.path.parent.parent == exiting
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(60) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    # with the handler: a clean exit, the folder removed at interpreter exit
    assert codes[0] == 143 and _ours(exiting) == [mine.path.parent]
    # without one the process dies at once and nothing runs: the folder stays...
    assert codes[1] == -signal.SIGTERM and _ours(killed) == [folders[1]]
    # ...until the next to_ort_nbits there, which removes it (no process holds it any more)
    monkeypatch.setattr(tempfile, "tempdir", str(killed))
    other = to_ort_nbits(q, batch, accuracy_level=0, threads=1)
    assert _ours(killed) == [other.path.parent]
    del mine, other


def test_only_marked_folders_no_live_process_holds_are_swept(tmp_path):
    from compactnn.kernels.nbits_files import OWNED, private_folder, release, sweep_stale

    held, lock = private_folder(tmp_path)  # this process holds its lock (another descriptor)
    older = tmp_path / "compactnn-nbits-older"  # no marker: an older compactnn's, or in making
    older.mkdir()
    dead = tmp_path / "compactnn-nbits-dead"  # marked, no lock held: its process died
    dead.mkdir()
    (dead / OWNED).touch()
    (dead / "model.onnx").write_bytes(b"x")
    unrelated = tmp_path / "other-tool"
    unrelated.mkdir()
    (unrelated / OWNED).touch()
    assert sweep_stale(tmp_path) == [dead]
    assert held.is_dir() and older.is_dir() and unrelated.is_dir() and not dead.exists()
    release(held, lock)
    assert not held.exists()
