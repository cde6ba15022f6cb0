"""The bit-packed XNOR/popcount convolution: integer results identical to a float64
convolution of the +-1 tensors (padding, channel tails, strides), sign packing, fallback.

The extension compiles once per machine (about 60-70 s the first time, then loaded from
``~/.cache/compactnn/torch_extensions``); the compiled tests skip when no compiler exists.
"""

import fcntl
import os
import re
import threading
import time
import warnings

import pytest
import torch
from torch.nn import functional as F

from compactnn.errors import CompactnnError
from compactnn.kernels import bitconv


@pytest.fixture(scope="session")
def ext():
    try:
        return bitconv.load_extension()
    except CompactnnError as exc:
        pytest.skip(f"bit-packed kernel not built (no working C++ compiler): {exc}")


def pm1(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.randn(shape, generator=g) >= 0, 1.0, -1.0)


# (N, C, O, H, W, k, stride, padding, dilation): channel tails (70, 130, 5), O below, at and
# above the 16-channel block, padding wider than 1, a 1x1 kernel, a 5x5 kernel
SHAPES = [
    (2, 70, 20, 7, 9, 3, 1, 1, 1),
    (1, 64, 64, 8, 8, 3, 2, 1, 1),
    (3, 130, 17, 6, 5, 3, 1, 2, 2),
    (1, 5, 3, 4, 4, 1, 1, 0, 1),
    (2, 128, 32, 9, 9, 5, 2, 2, 1),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_integer_output_equals_float_reference(ext, shape):
    n, c, o, h, w, k, s, p, d = shape
    x, wt = pm1((n, c, h, w), 0), pm1((o, c, k, k), 1)
    got = bitconv.bitconv2d(x, wt, s, p, d)
    ref = F.conv2d(x.double(), wt.double(), stride=s, padding=p, dilation=d)
    assert got.dtype == torch.int32
    assert torch.equal(got.double(), ref)


def test_zero_padding_counts_zero_not_minus_one(ext):
    # all +1 input and weights: a corner pixel of a 3x3 conv sees 4 valid taps of 70
    y = bitconv.bitconv2d(torch.ones(1, 70, 4, 4), torch.ones(2, 70, 3, 3), padding=1)
    assert (
        int(y[0, 0, 0, 0]) == 4 * 70
        and int(y[0, 0, 1, 1]) == 9 * 70
        and int(y[0, 0, 0, 1]) == 6 * 70
    )


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("out_channels", [16, 19])
def test_signs_of_shifted_float_input_and_scaled_output(ext, channels_last, out_channels):
    """Packing computes sign(x - shift) with sign(0) = +1 and NaN -> -1 on both memory
    layouts; the float output is dot * scale + bias."""
    g = torch.Generator().manual_seed(3)
    c = 40
    x = torch.randn(2, c, 6, 6, generator=g)
    shift = torch.randn(c, generator=g) * 0.3
    x[:, :, 0, :] = shift.view(1, c, 1)  # exactly on the threshold: +1
    x[0, 3, 2, 2] = float("nan")  # NaN >= 0 is false: -1, as torch.where(x >= 0, ...)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = pm1((out_channels, c, 3, 3), 4)
    conv = bitconv.BitConv2d(w > 0, (1, 1), (1, 1), (1, 1))
    signs = torch.where(x - shift.view(1, c, 1, 1) >= 0, 1.0, -1.0).double()
    ref = F.conv2d(signs, w.double(), padding=1)
    assert torch.equal(conv(x, shift).double(), ref)
    scale = torch.rand(out_channels, generator=g) + 0.1
    bias = torch.randn(out_channels, generator=g)
    y = conv(x, shift, scale, bias)
    want = ref * scale.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    assert y.dtype == torch.float32
    assert float((y.double() - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_pack_bits_bit_order():
    bits = torch.zeros(2, 70, dtype=torch.uint8)
    bits[0, 0] = bits[0, 63] = bits[1, 64] = bits[1, 69] = 1
    words = bitconv.pack_bits(bits)
    assert words.shape == (2, 2)
    assert int(words[0, 0]) == 1 + (1 << 63) - (1 << 64)  # bit 63 set: negative as int64
    assert int(words[0, 1]) == 0 and int(words[1, 0]) == 0
    assert int(words[1, 1]) == 1 + (1 << 5)


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no build there to import
    monkeypatch.setattr(bitconv, "_EXT", None)
    monkeypatch.setattr(bitconv, "_ERROR", None)
    monkeypatch.setattr(bitconv.shutil, "which", lambda *_: None)
    with pytest.raises(CompactnnError, match=r"C\+\+ compiler.*kernel='int8'"):
        bitconv.load_extension()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bitconv.available(warn=True) is False
    assert any("int8 kernels instead" in str(w.message) for w in caught)


def test_wrong_input_channels_named(ext):
    conv = bitconv.BitConv2d(torch.ones(4, 8, 3, 3, dtype=torch.bool), (1, 1), (1, 1), (1, 1))
    with pytest.raises(CompactnnError, match=r"\(N, 8, H, W\)"):
        conv(torch.randn(1, 9, 5, 5), torch.zeros(9))


@pytest.mark.parametrize("groups,out", [(1, 40), (2, 36), (1, 3)])
def test_stacked_quantize_equals_the_pytorch_ops(ext, groups, out):
    """The one-pass combine of two stacked kernel outputs: channels (groups, 2, out/groups)
    summed per term pair, divided, rounded half to even, shifted and clamped: identical to
    the PyTorch ops, values near k + 0.5 steps and both clamp ends included."""
    g = torch.Generator().manual_seed(3)
    scale, zero, lo, hi = 0.05, 7, 2, 250
    a = torch.randint(-40, 300, (9, groups, 1, out // groups), generator=g).float()
    y = torch.cat([(a + 0.5) * scale * 0.75, (a + 0.5) * scale * 0.25], dim=2)  # near ties
    y[0] = torch.randn(groups, 2, out // groups, generator=g) * 3  # ordinary values too
    y = y.reshape(9, 2 * out)
    pair = y.reshape(9, groups, 2, out // groups)
    s = (pair[:, :, 0] + pair[:, :, 1]).reshape(9, out)
    want = torch.clamp(torch.round(s / scale) + zero, lo, hi).to(torch.uint8)
    got = ext.stacked_quantize(y, groups, scale, zero, lo, hi)
    assert torch.equal(got, want)
    assert int(want.min()) == lo and int(want.max()) == hi  # both ends reached
    assert bool((torch.round(s / scale) % 2 != 0).any())  # odd codes: not everything a tie


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """``load_extension`` with torch's build replaced by a recorder (nothing compiles)."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(bitconv, "_EXT", None)
    monkeypatch.setattr(bitconv, "_ERROR", None)
    monkeypatch.setattr(bitconv.shutil, "which", lambda *_: "/usr/bin/c++")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("MAX_JOBS", raising=False)
    calls = []
    monkeypatch.setattr(cpp, "load", lambda **kw: calls.append(os.environ.get("MAX_JOBS")) or "ext")
    lock = tmp_path / bitconv._ext_name() / "lock"
    lock.parent.mkdir()
    return lock, calls


def _old(path):
    old = time.time() - 3600
    os.utime(path, (old, old))


def test_torchs_lock_file_left_by_a_clean_build_is_kept_without_notice(fake_build, caplog):
    # this torch's build lock is a flock (filelock), whose file stays after a clean build:
    # a later run an hour on must neither warn nor delete it (a live builder may hold it)
    lock, calls = fake_build
    lock.touch()
    (lock.parent / f"{bitconv._ext_name()}.so").touch()  # built: nothing to compile
    _old(lock)
    with caplog.at_level("WARNING", logger="compactnn"):
        assert bitconv.load_extension() == "ext"
    assert lock.exists() and caplog.text == ""
    assert calls == [str(len(os.sched_getaffinity(0)))]  # MAX_JOBS = the CPUs, for the build
    assert "MAX_JOBS" not in os.environ


def test_a_first_build_says_so(fake_build, caplog):
    _, calls = fake_build
    with caplog.at_level("WARNING", logger="compactnn"):
        assert bitconv.load_extension() == "ext"
    assert "compiling compactnn's CPU kernels (direct int8 and popcount) once" in caplog.text
    assert "removed" not in caplog.text and calls


def test_concurrent_loads_take_turns_and_never_delete_torchs_lock(fake_build, caplog):
    # another process builds: it holds compactnn.lock (and torch's lock, a plain old file
    # here); this load waits for it instead of deleting a lock someone may hold
    lock, calls = fake_build
    lock.touch()
    _old(lock)
    ours = lock.parent / bitconv.BUILD_LOCK
    done = threading.Event()
    with open(ours, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a flock on another open file: another holder
        with caplog.at_level("WARNING", logger="compactnn"):
            worker = threading.Thread(target=lambda: (bitconv.load_extension(), done.set()))
            worker.start()
            time.sleep(0.6)
            assert calls == [] and not done.is_set() and lock.exists()
    worker.join(10)
    assert done.is_set() and len(calls) == 1 and lock.exists() and ours.exists()
    assert "waiting for another process" in caplog.text and "removed" not in caplog.text


def test_a_leftover_baton_of_an_older_torch_is_removed_under_our_lock(
    fake_build, caplog, monkeypatch
):
    # a torch whose lock is a FileBaton deletes it after every build, so one present while
    # we hold compactnn.lock was left by a killed build, however young, and would block
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "FileBaton", object(), raising=False)
    monkeypatch.delattr(cpp, "FileLock", raising=False)
    lock, calls = fake_build
    lock.touch()
    with caplog.at_level("WARNING", logger="compactnn"):
        assert bitconv.load_extension() == "ext"
    assert not lock.exists() and "removed" in caplog.text and calls


def test_a_lock_held_too_long_falls_back_naming_the_file(fake_build, monkeypatch):
    lock, calls = fake_build
    monkeypatch.setattr(bitconv, "LOCK_WAIT_S", 0.2)
    ours = lock.parent / bitconv.BUILD_LOCK
    with open(ours, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another builder holds it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert bitconv.available(warn=True) is False
        with pytest.raises(CompactnnError, match=re.escape(str(ours))):
            bitconv.load_extension()  # the failure is kept: no second wait
    assert calls == [] and ours.exists()
    assert "let it finish" in str(caught[0].message)


def test_a_complete_build_is_imported_without_ninja_whatever_the_environment(
    fake_build, monkeypatch
):
    # processes that differ in PATH (which ninja: 1.11 and 1.13 each saw the other's log as
    # "command changed" and recompiled every file), CI, OMP_NUM_THREADS or MAX_JOBS share
    # one build: only the first goes through torch's load(); later ones import the module
    import torch.utils.cpp_extension as cpp

    lock, _ = fake_build
    name = bitconv._ext_name()
    so = lock.parent / f"{name}.so"
    builds, imports = [], []

    def build(**kw):
        builds.append(kw["build_directory"])
        so.write_bytes(b"module v1")
        return "built"

    monkeypatch.setattr(cpp, "load", build)
    monkeypatch.setattr(
        bitconv, "_import_built", lambda n, p: imports.append((n, p)) or "imp", raising=False
    )
    assert bitconv.load_extension() == "built"
    assert builds == [str(lock.parent)]
    envs = [{"CI": "true"}, {"OMP_NUM_THREADS": "1"}, {"MAX_JOBS": "1"}, {"PATH": "/usr/bin"}]
    for env in envs:
        monkeypatch.setattr(bitconv, "_EXT", None)  # as in a new process
        with monkeypatch.context() as m:
            # importing torch's build tools logs "No CUDA runtime is found" where an nvcc
            # exists: a complete build never consults them
            m.setattr(bitconv, "_torch_lock_is_baton", lambda: pytest.fail("build tools"))
            for key, value in env.items():
                m.setenv(key, value)
            assert bitconv._ext_name() == name
            assert bitconv.load_extension() == "imp"
    assert len(builds) == 1 and imports == [(name, so)] * len(envs)
    so.write_bytes(b"modu")  # changed since the stamp (half-written, relinked): not trusted
    monkeypatch.setattr(bitconv, "_EXT", None)
    assert bitconv.load_extension() == "built" and len(builds) == 2
    monkeypatch.setattr(bitconv, "_EXT", None)
    assert bitconv.load_extension() == "imp" and len(imports) == len(envs) + 1


def test_the_build_folder_follows_what_changes_the_binary(monkeypatch):
    name = bitconv._ext_name()
    monkeypatch.setenv("CXX", "clang++-99")
    assert bitconv._ext_name() != name
    monkeypatch.undo()
    monkeypatch.setattr(bitconv, "CFLAGS", (*bitconv.CFLAGS, "-g"))
    assert bitconv._ext_name() != name
    monkeypatch.undo()
    monkeypatch.setattr(bitconv.torch, "__version__", "0.0.1")
    assert bitconv._ext_name() != name
    monkeypatch.undo()
    assert bitconv._ext_name() == name


def test_a_build_runs_this_environments_ninja(fake_build, monkeypatch):
    ninja = pytest.importorskip("ninja")
    import torch.utils.cpp_extension as cpp

    seen = []
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a shell without the venv: system ninja
    monkeypatch.setattr(cpp, "load", lambda **kw: seen.append(os.environ["PATH"]) or "ext")
    assert bitconv.load_extension() == "ext"
    assert seen[0].split(os.pathsep)[0] == str(ninja.BIN_DIR)
    assert os.environ["PATH"] == "/usr/bin:/bin"
