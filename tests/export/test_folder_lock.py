"""Two saves into one folder at once: one whole artifact is left, exactly one save's.

``export/folder_lock.py`` serialises the saves (``export/replace.py`` holds the lock for a
whole save); a lock left by a killed save never blocks the next one.
"""

import os
import select
import signal
import threading
import time

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export import folder_lock, replace

USUAL = ["compactnn.json", "model.safetensors", "recipe.yaml"]
pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or folder_lock.fcntl is None, reason="needs os.fork and flock"
)


def net():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.fixture(scope="module")
def runs():
    """Two compressed models (different weights) and an input."""
    torch.manual_seed(0)
    a = compactnn.compress(net(), "w8", progress=False)
    torch.manual_seed(1)
    b = compactnn.compress(net(), "w8", progress=False)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return {"a": (a, a(x)), "b": (b, b(x))}, x


def fork_save(model, path, errfile, *, hook=None, force=False, ready_fd=None):
    """Fork a child that saves ``model`` to ``path``; exit 0 saved, 2 CompactnnError, 1 else.

    ``save`` passes its ``force`` on to the writer (False: refused while another save runs);
    ``ready_fd``: write a byte there as the writer starts.
    """
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork
            replace.STEP_HOOK = hook
            write = replace.write_artifact

            def writer(*args, **kwargs):
                if ready_fd is not None:
                    os.write(ready_fd, b"b")
                return write(*args, **kwargs)  # save passes its own force= on

            replace.write_artifact = writer
            compactnn.save(model, path, force=force)
            code = 0
        except CompactnnError as exc:
            errfile.write_text(f"{type(exc).__name__}: {exc}")
            code = 2
        except BaseException as exc:  # report any other to the parent
            errfile.write_text(repr(exc))
        finally:
            os._exit(code)
    return pid


def wait_child(pid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("a save in a child process hung")
        time.sleep(0.005)
    return done[1]


def loaded_output(path, x):
    with torch.no_grad():
        return compactnn.load(path, model=net())(x)


@pytest.mark.parametrize("refuse", [False, True], ids=["force-waits", "no-force-refuses"])
def test_two_processes_saving_at_once_leave_exactly_one_runs_artifact(runs, tmp_path, refuse):
    models, x = runs
    out = tmp_path / "conc"
    out.mkdir()
    a_staged, a_staged_w = os.pipe()
    b_writes, b_writes_w = os.pipe()

    def pause_after_staging(step):  # run a: tensors staged, not committed, until b writes
        if step == "staged tensors":
            os.write(a_staged_w, b"a")
            assert select.select([b_writes], [], [], 5)[0]
            time.sleep(0.3)  # b is in its writer now: it must not touch a's staged files

    pid_a = fork_save(models["a"][0], out, tmp_path / "a.err", hook=pause_after_staging)
    ready = select.select([a_staged], [], [], 20)[0]  # never block on a child that died
    assert ready and os.read(a_staged, 1) == b"a", (tmp_path / "a.err").read_text()
    b = models["b"][0]
    pid_b = fork_save(b, out, tmp_path / "b.err", force=not refuse, ready_fd=b_writes_w)
    status = {"a": wait_child(pid_a), "b": wait_child(pid_b)}
    codes = {k: os.waitstatus_to_exitcode(s) for k, s in status.items()}
    errors = {k: (tmp_path / f"{k}.err").read_text() for k in codes if codes[k]}
    if refuse:  # b finds a's save running: one line, nothing of its own written
        assert codes == {"a": 0, "b": 2}, errors
        busy = f"FolderBusyError: the folder {str(out)!r} is being written by another"
        assert errors["b"].startswith(f"{busy} compactnn process (pid {pid_a})")
        winner = "a"
    else:  # b waits for a, then replaces its artifact whole
        assert codes == {"a": 0, "b": 0}, errors
        winner = "b"
    assert sorted(os.listdir(out)) == USUAL  # no staged file, no lock file, no mix
    assert torch.equal(loaded_output(out, x), models[winner][1])


def test_a_save_refused_after_another_commits_writes_nothing(runs, tmp_path):
    models, _ = runs
    out = tmp_path / "late"
    compactnn.save(models["a"][0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(folder_lock.FolderBusyError, match=r"received an artifact from another"):
        replace.write_artifact(out, {}, lambda files: {}, force=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_lock_left_by_a_killed_save_does_not_block_the_next(runs, tmp_path):
    models, x = runs
    out = tmp_path / "killed"

    def die(step):
        if step == "staged tensors":
            os.kill(os.getpid(), signal.SIGKILL)

    status = wait_child(fork_save(models["a"][0], out, tmp_path / "a.err", hook=die))
    assert os.WIFSIGNALED(status)
    assert folder_lock.LOCK_NAME in os.listdir(out)  # left behind, its holder dead
    assert replace.is_stray(folder_lock.LOCK_NAME)  # so the folder still counts as empty
    t0 = time.monotonic()
    compactnn.save(models["b"][0], out)  # force=False: the dead save's lock is no owner
    assert time.monotonic() - t0 < 5
    assert sorted(os.listdir(out)) == USUAL
    assert torch.equal(loaded_output(out, x), models["b"][1])


def test_threads_of_one_process_exclude_each_other(tmp_path):
    held, release, got = threading.Event(), threading.Event(), []
    waiter_holds, waiter_release = threading.Event(), threading.Event()

    def holder():
        with folder_lock.locked(tmp_path, wait=False):
            with folder_lock.locked(tmp_path, wait=False):  # its own lock: taken again
                held.set()
            release.wait(5)

    def waiter():  # waits on the holder's file, which the holder deletes on release
        with folder_lock.locked(tmp_path, wait=True):
            got.append(os.stat(tmp_path / folder_lock.LOCK_NAME).st_ino)
            waiter_holds.set()
            waiter_release.wait(5)

    first = threading.Thread(target=holder)
    first.start()
    assert held.wait(5)
    with pytest.raises(CompactnnError, match=rf"another compactnn process \(pid {os.getpid()}\)"):
        with folder_lock.locked(tmp_path, wait=False):
            pass
    second = threading.Thread(target=waiter)
    second.start()
    time.sleep(0.1)  # the waiter blocks on the holder's lock file
    assert not waiter_holds.is_set()
    release.set()
    first.join(5)
    assert waiter_holds.wait(5)  # the waiter now holds the lock, on a file named the lock
    with pytest.raises(CompactnnError, match="is being written by another"):
        with folder_lock.locked(tmp_path, wait=False):
            pass
    waiter_release.set()
    second.join(5)
    assert got and os.listdir(tmp_path) == []
