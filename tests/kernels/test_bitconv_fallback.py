"""Without compactnn's CPU kernels (no compiler, a failed build), deploy runs on oneDNN /
PyTorch ops: the process says so once, in one line with the reason and the fix, however
many layers ask. A build copied in from a like machine loads without a compiler."""

import warnings

import pytest

from compactnn.kernels import bitconv


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not loaded the extension yet, with an empty build folder."""
    for name, value in (("_EXT", None), ("_ERROR", None), ("_NOTICE", ""), ("_WARNED", False)):
        monkeypatch.setattr(bitconv, name, value)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def _warnings_of(calls: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # no deduplication by location: the module's own
        assert [bitconv.available() for _ in range(calls)] == [False] * calls
    return [str(w.message) for w in caught]


def test_no_compiler_warns_once_with_the_reason_and_the_fix(fresh, monkeypatch):
    monkeypatch.setattr(bitconv.shutil, "which", lambda *_: None)
    monkeypatch.setenv("CXX", "clang++-77")
    (msg,) = _warnings_of(5)
    assert "\n" not in msg
    assert "compactnn's CPU kernels could not be built" in msg
    assert "no C++ compiler: neither clang++-77 nor g++ is on PATH" in msg
    assert "oneDNN / PyTorch ops instead (slower on small and depthwise models" in msg
    assert "install g++" in msg and "TORCH_EXTENSIONS_DIR" in msg
    assert f"copy the {bitconv._ext_name()} folder" in msg and str(fresh) in msg
    assert _warnings_of(3) == []  # later layers, later deploys: nothing more


def test_a_failed_build_warns_once_with_its_first_line(fresh, monkeypatch):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(bitconv.shutil, "which", lambda *_: "/usr/bin/c++")
    calls = []

    def broken(**kw):
        calls.append(kw)
        raise RuntimeError("Error building extension 'x'\n[1/10] c++ -c bitconv.cpp ...")

    monkeypatch.setattr(cpp, "load", broken)
    (msg,) = _warnings_of(4)
    assert "(the build failed: RuntimeError: Error building extension 'x')" in msg
    assert "\n" not in msg and len(calls) == 1  # built once, the failure remembered


def test_the_binary_layers_keep_their_own_message(fresh, monkeypatch):
    monkeypatch.setattr(bitconv.shutil, "which", lambda *_: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bitconv.available(warn=True) is False
        assert bitconv.available(warn=True) is False
    msgs = [str(w.message) for w in caught]
    assert sum("could not be built" in m for m in msgs) == 1
    assert sum("Using the int8 kernels instead." in m for m in msgs) == 2


def test_a_copied_build_loads_without_a_compiler(fresh, monkeypatch):
    monkeypatch.setattr(bitconv.shutil, "which", lambda *_: None)
    name = bitconv._ext_name()
    folder = fresh / name
    folder.mkdir()
    so = folder / f"{name}.so"
    so.write_bytes(b"module built on a like machine")
    bitconv._write_stamp(folder / bitconv.BUILT_STAMP, so)
    imported = []
    monkeypatch.setattr(bitconv, "_import_built", lambda n, p: imported.append((n, p)) or "ext")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bitconv.available() is True and bitconv.load_extension() == "ext"
    assert imported == [(name, so)] and caught == []
    monkeypatch.setattr(bitconv, "_EXT", None)
    so.write_bytes(b"truncated")  # no longer what the stamp records: needs a compiler
    with pytest.raises(bitconv.CompactnnError, match=r"needs a C\+\+ compiler"):
        bitconv.load_extension()


def test_a_held_lock_names_its_own_fix(fresh, monkeypatch):
    import fcntl

    monkeypatch.setattr(bitconv.shutil, "which", lambda *_: "/usr/bin/c++")
    monkeypatch.setattr(bitconv, "LOCK_WAIT_S", 0.2)
    lock = fresh / bitconv._ext_name() / bitconv.BUILD_LOCK
    lock.parent.mkdir()
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another builder holds it
        (msg,) = _warnings_of(2)
    assert f"another process has held the build lock {lock}" in msg
    assert "let that build finish" in msg and "install g++" not in msg


def test_a_copied_build_that_does_not_import_falls_back_with_a_warning(fresh, monkeypatch):
    monkeypatch.setattr(bitconv.shutil, "which", lambda *_: None)
    name = bitconv._ext_name()
    (fresh / name).mkdir()
    so = fresh / name / f"{name}.so"
    so.write_bytes(b"not an ELF module")  # stamped, but not loadable on this machine
    bitconv._write_stamp(fresh / name / bitconv.BUILT_STAMP, so)
    (msg,) = _warnings_of(3)
    assert f"could not be built ({so} does not import here (" in msg and "\n" not in msg
    with pytest.raises(bitconv.CompactnnError, match="install a C\\+\\+ compiler to rebuild"):
        bitconv.load_extension()
