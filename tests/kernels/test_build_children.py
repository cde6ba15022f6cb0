"""A build interrupted by Ctrl-C / SIGTERM leaves no compiler running: torch kills only
ninja, whose compilers (in their own process groups) would re-parent to PID 1 and go on.
Here a fake build leaves a ``sleep 30`` behind in the same way (nothing compiles)."""

import ctypes
import os
import subprocess
import sys
import time

import pytest

from compactnn.kernels import bitconv, build_children

pytestmark = pytest.mark.skipif(
    build_children._prctl() is None, reason="child subreapers are a Linux feature"
)

# a "ninja" that starts a "compiler" in its own session, says its pid, then waits
NINJA = (
    "import subprocess, sys\n"
    "c = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
    "print(c.pid, flush=True)\n"
    "sys.stdin.read()\n"
)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie or a reaped process does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _interrupted_build() -> int:
    """What ``subprocess.run`` does on Ctrl-C: ninja killed, its compiler orphaned; then the
    interrupt goes on. Returns the orphan's pid (through the exception's note)."""
    ninja = subprocess.Popen(
        [sys.executable, "-c", NINJA], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    compiler = int(ninja.stdout.readline())
    ninja.kill()
    ninja.wait()
    raise KeyboardInterrupt(compiler)


@pytest.fixture
def sleeper():
    """A child of ours from before the build: never the build's to stop."""
    p = subprocess.Popen(["sleep", "30"])
    yield p
    p.kill()
    p.wait()


def _subreaper() -> int:
    value = ctypes.c_int(-1)
    assert build_children._prctl()(37, ctypes.addressof(value), 0, 0, 0) == 0
    return value.value


def test_an_interrupted_build_stops_the_orphaned_compiler(sleeper):
    before = _subreaper()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as caught:
        with build_children.reaped_descendants():
            _interrupted_build()
    compiler = caught.value.args[0]
    try:
        assert not _alive(compiler)  # the orphan re-parented to us and was stopped, reaped
        assert not os.path.exists(f"/proc/{compiler}")  # no zombie left either
        assert _alive(sleeper.pid) and sleeper.poll() is None  # ours from before: untouched
        assert _subreaper() == before
        assert time.monotonic() - start < 5
    finally:
        if _alive(compiler):
            os.kill(compiler, 9)


def test_without_the_guard_the_compiler_outlives_the_build():
    """What the guard fixes (and that the fake reproduces it): the orphan keeps running."""
    with pytest.raises(KeyboardInterrupt) as caught:
        _interrupted_build()
    compiler = caught.value.args[0]
    try:
        assert _alive(compiler)
    finally:
        os.kill(compiler, 9)


def test_load_extension_stops_the_compilers_of_an_interrupted_build(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(bitconv, "_EXT", None)
    monkeypatch.setattr(bitconv, "_ERROR", None)
    monkeypatch.setattr(bitconv.shutil, "which", lambda *_: "/usr/bin/c++")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "load", lambda **kw: _interrupted_build())
    with pytest.raises(KeyboardInterrupt) as caught:  # an interrupt, not a failed build
        bitconv.load_extension()
    compiler = caught.value.args[0]
    try:
        assert not _alive(compiler)
        assert bitconv._ERROR is None  # the next call builds again
    finally:
        if _alive(compiler):
            os.kill(compiler, 9)


def test_a_build_that_raises_nothing_is_left_alone(sleeper):
    with build_children.reaped_descendants():
        pass
    assert build_children.stop_descendants(frozenset({sleeper.pid})) == 0
    assert sleeper.poll() is None
