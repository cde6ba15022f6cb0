"""A load racing a save of the same folder: it waits for the save and reads its result.

``export/folder_lock.shared`` (taken by ``export/reader.read_artifact``) against
``folder_lock.locked`` (held by every save).
"""

import os
import shutil
import threading

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import ArtifactError
from compactnn.export import folder_lock, reader

pytestmark = pytest.mark.skipif(folder_lock.fcntl is None, reason="needs flock")


def net(seed):
    torch.manual_seed(seed)
    return compactnn.compress(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), "w8", progress=False
    )


@pytest.fixture()
def two(tmp_path):
    """Artifact a saved in ``dest``, and b's files ready in ``b``."""
    compactnn.save(net(0), tmp_path / "dest")
    compactnn.save(net(1), tmp_path / "b")
    return tmp_path / "dest", tmp_path / "b"


def test_load_waits_for_a_save_in_progress(two):
    dest, b = two
    want = reader.artifact_digest(b)
    holding, release, result = threading.Event(), threading.Event(), {}

    def writer():  # a save: holds the folder's lock, leaves it half written, then finishes
        with folder_lock.locked(dest, wait=True):
            holding.set()
            release.wait(10)
            (dest / "compactnn.json").write_text("{")  # half written
            for f in b.iterdir():
                if f.name != folder_lock.LOCK_NAME:
                    shutil.copy2(f, dest / f.name)

    def load():
        try:
            result["digest"] = reader.artifact_digest(dest)
        except ArtifactError as exc:
            result["error"] = str(exc)

    w = threading.Thread(target=writer)
    w.start()
    assert holding.wait(10)
    r = threading.Thread(target=load)
    r.start()
    r.join(0.3)
    assert r.is_alive(), "the load did not wait for the save in progress"
    release.set()
    w.join(10)
    r.join(10)
    assert result == {"digest": want}
    assert not os.path.lexists(dest / folder_lock.LOCK_NAME)  # the reader created nothing


def test_a_save_waits_for_a_load_in_progress(two):
    dest, _ = two
    (dest / folder_lock.LOCK_NAME).write_text("")  # a killed save's leftover: not held
    entered = threading.Event()
    with folder_lock.shared(dest):
        t = threading.Thread(target=lambda: folder_lock.locked(dest, wait=True).__enter__())
        t.daemon = True
        t.start()
        t.join(0.3)
        assert t.is_alive(), "the save did not wait for the load"
        entered.set()
    t.join(10)
    assert not t.is_alive()


def test_a_read_failing_while_a_save_started_is_read_again(two, monkeypatch):
    dest, _ = two
    want = reader.artifact_digest(dest)
    once = reader._read_once
    calls = []

    def racing(path, expect):
        calls.append(path)
        if len(calls) == 1:  # a save starts under the first read and leaves its lock file
            (dest / folder_lock.LOCK_NAME).write_text("")
            raise ArtifactError("compactnn.json was modified after saving")
        return once(path, expect)

    monkeypatch.setattr(reader, "_read_once", racing)
    assert reader.artifact_digest(dest) == want
    assert len(calls) == 2


def test_a_damaged_artifact_without_a_save_still_fails_once(two, monkeypatch):
    dest, _ = two
    (dest / "compactnn.json").write_text("{")
    once, calls = reader._read_once, []
    monkeypatch.setattr(reader, "_read_once", lambda p, e: calls.append(p) or once(p, e))
    with pytest.raises(ArtifactError):
        reader.artifact_digest(dest)
    assert len(calls) == 1


def test_a_fifo_lock_file_does_not_block_the_read(two):
    dest, _ = two
    os.mkfifo(dest / folder_lock.LOCK_NAME)
    assert len(reader.artifact_digest(dest)) == 64
