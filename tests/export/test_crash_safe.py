"""A ``--force`` save killed at any instant leaves the old or the new artifact, bit-exact.

A forked child replaces an artifact and is SIGKILLed at every named step of the save
(:data:`compactnn.export.replace.STEP_HOOK`) and at ``COMPACTNN_KILL_POINTS`` (default 8)
evenly spaced instants of its measured duration. Exceptions (a full disk) leave the old
artifact and no stray file.
"""

import errno
import os
import shutil
import signal
import time

import pytest
import torch
from torch import nn

import compactnn
from compactnn.export import artifact, replace

POINTS = int(os.environ.get("COMPACTNN_KILL_POINTS", "8"))
USUAL = ["compactnn.json", "model.safetensors", "recipe.yaml"]
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 512),  # ~1 MB of float weights: a save takes some milliseconds
        nn.ReLU(),
        nn.Linear(512, 10),
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    old = compactnn.compress(net(0), "w8a8", calib_data=x, progress=False)
    new = compactnn.compress(net(1), "w4a8", calib_data=x, progress=False)
    base = tmp_path_factory.mktemp("kill") / "old"
    compactnn.save(old, base)
    with torch.no_grad():
        return base, new, x, old(x), new(x)


def outcome(path, x, y_old, y_new):
    with torch.no_grad():
        y = compactnn.load(path, model=net(0))(x)
    return "old" if torch.equal(y, y_old) else "new" if torch.equal(y, y_new) else "other"


def run_child(path, new, kill_at=None, delay=None):
    """Fork a child that force-saves ``new`` over ``path``; return its wait status."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork
            if kill_at is not None:
                replace.STEP_HOOK = lambda s: s == kill_at and os.kill(os.getpid(), signal.SIGKILL)
            compactnn.save(new, path, force=True)
        finally:
            os._exit(0)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("a save in the child process hung")
        time.sleep(0.002)
    return done[1]


def steps_of_a_save(models, tmp_path):
    base, new, *_ = models
    seen = []
    replace.STEP_HOOK = seen.append
    try:
        shutil.copytree(base, tmp_path / "probe")
        compactnn.save(new, tmp_path / "probe", force=True)
    finally:
        replace.STEP_HOOK = None
    return seen


@pytest.mark.slow
def test_killed_force_save_leaves_old_or_new_artifact(models, tmp_path):
    base, new, x, y_old, y_new = models
    steps = steps_of_a_save(models, tmp_path)
    assert steps[:3] == ["cleaned", "staged tensors", "staged recipe"] and "committed" in steps
    t0 = time.perf_counter()
    run_child(tmp_path / "probe", new)
    duration = time.perf_counter() - t0
    results = []
    points = [("step", s) for s in steps] + [
        ("time", duration * (i + 1) / (POINTS + 1)) for i in range(POINTS)
    ]
    for i, (how, at) in enumerate(points):
        path = tmp_path / f"k{i}"
        shutil.copytree(base, path)
        if how == "step":
            status = run_child(path, new, kill_at=at)
            assert os.WIFSIGNALED(status), at  # killed exactly there
        else:
            run_child(path, new, delay=at)
        results.append((how, at, outcome(path, x, y_old, y_new)))
        compactnn.save(new, path, force=True)  # the next save removes the leftovers
        assert sorted(os.listdir(path)) == USUAL
    print(f"\nkill points: {len(points)}; outcomes: {[r[2] for r in results]}")
    assert all(r[2] in ("old", "new") for r in results), results
    assert results[0][2] == "old" and results[len(steps) - 1][2] == "new"  # first / last step


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["tensors", "header"])
def test_full_disk_keeps_the_old_artifact_and_no_stray_file(models, tmp_path, monkeypatch, where):
    base, new, x, y_old, y_new = models
    path = tmp_path / "a"
    shutil.copytree(base, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def half_then_full(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        _disk_full()

    if where == "tensors":
        monkeypatch.setattr(artifact, "write_tensors", half_then_full)
    else:
        monkeypatch.setattr(replace, "atomic_write_text", _disk_full)
    with pytest.raises(OSError, match="No space"):
        compactnn.save(new, path, force=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert outcome(path, x, y_old, y_new) == "old"


def test_force_save_without_recipe_leaves_no_stale_recipe(models, tmp_path):
    base, _, x, *_ = models
    path = tmp_path / "a"
    shutil.copytree(base, path)
    plain = net(2)
    compactnn.save(plain, path, force=True)  # a float model: no recipe
    assert sorted(os.listdir(path)) == ["compactnn.json", "model.safetensors"]
    loaded = compactnn.load(path, model=net(0))
    assert compactnn.info_of(loaded)["recipe"] is None
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))
