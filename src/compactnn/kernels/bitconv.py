"""Bit-packed XNOR/popcount 2-D convolution of ``+1/-1`` tensors (a C++ extension).

A binary convolution's dot product over ``K`` values of ``+1/-1`` is
``K - 2 * popcount(x XOR w)`` on their bits (bit 1 = +1). Here activations are packed NHWC,
64 input channels per ``uint64`` word, and weights per tap and word with the output channels
last; the kernel (``csrc/bitconv.cpp``) XORs, counts and accumulates 8 output channels per
AVX-512 ``vpopcntq`` (a portable ``__builtin_popcountll`` loop where the compiler target has
no VPOPCNTDQ). Zero padding contributes 0, not ``+-1``, and channel counts that are not a
multiple of 64 leave the unused bits 0 in both operands, so the integer results equal a float
convolution of the ``+-1`` tensors exactly.

The extension is compiled on first use (g++ and ninja, a few minutes, with ``MAX_JOBS``
compilers: the CPU count unless set) into ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/compactnn/torch_extensions``, once per build identity (:func:`build_identity`:
sources, flags, compiler, torch, Python, CPU), which names the folder; the build says so on
the ``compactnn`` logger first. A successful build leaves ``compactnn.built`` (the module's
size and SHA-256); a later process that finds it matching imports the module directly,
without torch's ``load()`` and ninja. Going through ninja on every load rebuilt everything
whenever processes on one machine found different ``ninja`` binaries on their ``PATH`` (the
venv's pip ninja 1.13 and the system's 1.11): they hash commands differently and 1.13
discards an older log, so each saw every command as changed. A build that is needed runs this
Python environment's ``ninja`` package first on ``PATH``, so it resumes incrementally.

Without a compiler :func:`available` is False and :func:`load_extension` raises a
:class:`~compactnn.errors.CompactnnError`; callers fall back to oneDNN / PyTorch ops, and the
first :func:`available` in the process warns once (the reason and the fix). A stamped build
copied in from a machine with the same build identity loads without a compiler. A build
interrupted by Ctrl-C or SIGTERM stops the compilers it started (:mod:`.build_children`).

Concurrent processes take turns: each holds an OS ``flock`` on the build folder's
``compactnn.lock`` around torch's whole build-and-import, waiting up to ``LOCK_WAIT_S`` for
another process's build, after which it falls back the same way (the message names the
file). The kernel drops a ``flock`` when its holder dies, so a killed build never leaves
that lock held, and the file itself is never deleted (deleting a file someone may be locking
would let two builds run at once). torch's own ``lock`` file in the folder is left alone:
this torch holds it as a ``flock`` too (``filelock``), keeps the file after a clean build and
ignores it when unheld. Only a torch whose build lock is a ``FileBaton`` (an ``O_EXCL`` file
whose mere existence blocks every later load) needs a leftover one removed; that is done
with a notice while this process holds ``compactnn.lock``, when no compactnn build can be
alive in the folder (every compactnn build holds it, and the folder, named by the build
identity's hash, is compactnn's alone).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compactnn.errors import CompactnnError, first_line, user_stacklevel
from compactnn.kernels.build_children import max_jobs, pinned_ninja, reaped_descendants

SOURCE = Path(__file__).with_name("csrc") / "bitconv.cpp"
# the few-input-channel and one- or two-term int8 convolutions of the runner
# (compactnn.deployment.runner), same module
# a small CNN head's pool + quantization and int8 linear layer, the quantization and
# max-pool of uint8 codes, and the depthwise int8 convolution, same module
SOURCES = tuple(
    SOURCE.with_name(f)
    for f in (
        "bitconv.cpp",
        "smallconv.cpp",
        "termconv.cpp",
        "pointwise.cpp",
        "head.cpp",
        "codes.cpp",
        "dwconv.cpp",
        "dwconv_int.cpp",
        "squeeze.cpp",
        "dwblock.cpp",
    )
)
# part of the build's identity, like the sources
HEADERS = (SOURCE.with_name("termconv.h"), SOURCE.with_name("dwconv.h"))
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)
OUT_BLOCK = 16  # output channels per kernel block (the packed weight's padding)

LOCK_WAIT_S = 15 * 60.0  # how long to wait for another process's build (a first build on
# two shared cores took over 5 minutes, measured)
BUILD_LOCK = "compactnn.lock"  # our flock around torch's build and import, never deleted
BUILT_STAMP = "compactnn.built"  # written after a successful build: the module's digest

_EXT = None
_ERROR: str | None = None
_NOTICE = ""  # available()'s one warning when the kernels are missing (_failed)
_WARNED = False
_log = logging.getLogger("compactnn")


class _NoCudaNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." (logged when
    ``torch.utils.cpp_extension`` is first imported on a machine with a CUDA toolkit and no
    GPU: our build, Inductor's): noise for CPU kernels. Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_cuda_notice() -> None:
    """Install :class:`_NoCudaNotice` on torch's C++ extension logger (once): done by the
    first :func:`load_extension` and by ``python -m compactnn.bench``."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaNotice) for f in logger.filters):
        logger.addFilter(_NoCudaNotice())


def build_directory() -> Path:
    """Where the extension is built: ``$TORCH_EXTENSIONS_DIR`` or the compactnn cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "compactnn" / "torch_extensions"
    return base


def _cpu_features() -> str:
    """What ``-march=native`` compiles for: the first ``flags`` line of ``/proc/cpuinfo``
    (a cache shared by machines with different CPUs gets one build per CPU)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.partition(":")[2].strip()
    return f"{platform.machine()} {platform.processor()}"


def build_identity() -> dict[str, str]:
    """Everything the compiled module depends on; its hash names the build folder.

    Only what changes the binary is in it: process settings such as ``PATH`` (which
    ``ninja``), ``MAX_JOBS``, ``OMP_NUM_THREADS`` or ``CI`` are not, so processes that
    differ only in those share one build.
    """
    sources = hashlib.sha256()
    for p in SOURCES + HEADERS:
        sources.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    abi = getattr(sys, "abiflags", "")
    return {
        "sources": sources.hexdigest(),
        "cflags": " ".join(CFLAGS),
        "ldflags": " ".join(LDFLAGS),
        "cxx": os.environ.get("CXX", "c++"),
        "torch": f"{torch.__version__} {Path(torch.__file__).parent}",
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}{abi} "
        f"{sysconfig.get_path('include', scheme='posix_prefix')}",
        "cpu": _cpu_features(),
    }


def _ext_name() -> str:
    identity = json.dumps(build_identity(), sort_keys=True).encode()
    return f"compactnn_bitconv_{hashlib.sha256(identity).hexdigest()[:12]}"


def load_extension():
    """The compiled extension module (built on the first call, then cached on disk).

    Raises:
        CompactnnError: no C++ compiler or the build failed (the message says which, and
            that the int8 kernels remain available).

    Example:
        >>> ext = load_extension()  # doctest: +SKIP
    """
    global _EXT
    if _EXT is not None:
        return _EXT
    if _ERROR is not None:
        raise CompactnnError(_ERROR)
    quiet_cuda_notice()  # before anything imports torch.utils.cpp_extension
    name = _ext_name()
    build = build_directory() / name
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        so = build / f"{name}.so"
        try:  # a build copied from a like machine: nothing to compile, no lock
            _EXT = _import_built(name, so) if _stamp_matches(build / BUILT_STAMP, so) else None
        except (ImportError, OSError) as exc:  # a library it links is missing here, ...
            why = f"{so} does not import here ({first_line(exc, 120)})"
            raise _failed(f"{why}; install a C++ compiler to rebuild it.", why) from exc
        if _EXT is not None:
            return _EXT
        raise _failed(
            "the bit-packed binary convolution needs a C++ compiler (g++ or clang++) to build "
            "its PyTorch extension, and none was found; install one (e.g. apt-get install g++) "
            "or deploy binary layers with kernel='int8'.",
            f"no C++ compiler: neither {cxx} nor g++ is on PATH",
        )
    lock = build / BUILD_LOCK
    try:
        build.mkdir(parents=True, exist_ok=True)  # HOME unreadable, a file on the path: below
        fd = _take_build_lock(lock, build / f"{name}.so")
    except OSError as exc:  # a read-only cache, ...
        raise _failed(
            f"cannot lock {lock} to build compactnn's CPU kernels ({exc.strerror}); set "
            "TORCH_EXTENSIONS_DIR to a writable folder, or deploy with kernel='int8'.",
            f"cannot lock {lock}: {exc.strerror}",
            "set TORCH_EXTENSIONS_DIR to a writable folder",
        ) from exc
    if fd is None:
        raise _failed(
            f"compactnn's CPU kernels are being built by another process, which has held "
            f"{lock} for over {LOCK_WAIT_S / 60:.0f} minutes; let it finish (or stop it) "
            "and retry. The lock is released when that process exits.",
            f"another process has held the build lock {lock} for {LOCK_WAIT_S / 60:.0f} minutes",
            "let that build finish (or stop it) and run again",
        )
    try:
        _EXT = _load_or_build(name, build)
    except Exception as exc:  # compiler errors, missing ninja, ...
        raise _failed(
            f"building the bit-packed binary convolution failed ({type(exc).__name__}: "
            f"{str(exc)[-300:]}); deploy binary layers with kernel='int8', or fix the "
            f"toolchain and remove {build}.",
            f"the build failed: {type(exc).__name__}: {first_line(exc, 120)}",
        ) from exc
    finally:
        os.close(fd)  # releases the flock
    return _EXT


def _failed(error: str, reason: str, fix: str = "") -> CompactnnError:
    """Remember why the extension is missing: ``error`` is :func:`load_extension`'s message
    from now on; ``reason`` and ``fix`` (default: a compiler, or a copied build) make
    :func:`available`'s one-line warning."""
    global _ERROR, _NOTICE
    fix = fix or (
        "install g++ (or set CXX), or build them once on a machine with the same CPU, Python "
        f"and torch install and copy the {_ext_name()} folder it makes (under "
        f"TORCH_EXTENSIONS_DIR or ~/.cache/compactnn/torch_extensions) into {build_directory()}"
    )
    _ERROR, _NOTICE = (
        error,
        (
            f"compactnn's CPU kernels could not be built ({reason}), so deployed models run on "
            "oneDNN / PyTorch ops instead (slower on small and depthwise models, up to 12x "
            f"measured); {fix}."
        ),
    )
    return CompactnnError(error)


def _load_or_build(name: str, build: Path):
    """Under ``compactnn.lock``: the module from a complete build in ``build`` (its stamp
    matches the file), imported without ninja; else torch's ``load()`` builds (or finishes
    building) it and the stamp is written."""
    so = build / f"{name}.so"
    if _stamp_matches(build / BUILT_STAMP, so):
        return _import_built(name, so)  # without importing torch.utils.cpp_extension, which
        # logs "No CUDA runtime is found" on machines with an nvcc and no GPU
    _remove_leftover_baton(build / "lock")
    if not so.exists():
        what = "compactnn's CPU kernels (direct int8 and popcount)"
        _log.warning(
            "compiling %s once (a few minutes, longer on a busy machine) into %s", what, build
        )
    from torch.utils.cpp_extension import load

    with max_jobs(), pinned_ninja(), reaped_descendants():  # no compiler outlives a Ctrl-C
        ext = load(
            name=name,
            sources=[str(p) for p in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(build),
            verbose=False,
        )
    if so.exists():
        _write_stamp(build / BUILT_STAMP, so)
    return ext


def _module_digest(so: Path) -> dict[str, object]:
    data = so.read_bytes()
    return {"module": so.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _stamp_matches(stamp: Path, so: Path) -> bool:
    """Whether ``stamp`` records exactly the module ``so`` now holds (a half-written,
    relinked or missing module, or no stamp: False)."""
    try:
        recorded = json.loads(stamp.read_text())
        return {k: recorded.get(k) for k in ("module", "size", "sha256")} == _module_digest(so)
    except (OSError, ValueError, AttributeError):
        return False


def _write_stamp(stamp: Path, so: Path) -> None:
    """Record the built module (with the build identity, for people), atomically."""
    record = {**_module_digest(so), "identity": build_identity()}
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, stamp)


def _import_built(name: str, so: Path):
    """Import the compiled module ``name`` from ``so`` (what torch's ``load()`` does last)."""
    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {so}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _take_build_lock(lock: Path, built: Path) -> int | None:
    """An open descriptor of ``lock`` holding an exclusive ``flock`` (close it to release),
    or None when another process held it for ``LOCK_WAIT_S``. Says so on the logger when
    the wait is for a build (``built``, the compiled module, missing): a process that only
    imports the module holds the lock for milliseconds."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_S
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        except BaseException:
            os.close(fd)
            raise
        if time.monotonic() >= deadline:
            os.close(fd)
            return None
        if not waited and not built.exists():
            _log.warning(
                "waiting for another process to finish building compactnn's CPU kernels "
                "(lock file %s; at most %.0f minutes)",
                lock,
                LOCK_WAIT_S / 60,
            )
            waited = True
        time.sleep(min(0.2, LOCK_WAIT_S / 10))


def _torch_lock_is_baton() -> bool:
    """Whether torch's extension build lock is an existence lock (``FileBaton``, older torch)
    rather than a ``flock`` (``filelock.FileLock``, this torch), which keeps its file."""
    import torch.utils.cpp_extension as cpp

    return hasattr(cpp, "FileBaton") and not hasattr(cpp, "FileLock")


def _remove_leftover_baton(lock: Path) -> None:
    """Under our ``flock`` only: remove torch's ``lock`` where it is an existence lock, which
    a clean build deletes, so one present now was left by a build killed mid-way (it would
    block this load forever). Where torch's lock is a ``flock`` its file stays, untouched."""
    if not _torch_lock_is_baton():
        return
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
        _log.warning("removed %s, left by an interrupted build of compactnn's kernels", lock)


def available(warn: bool = False) -> bool:
    """Whether the extension loads (compiling it if needed). When it does not, the first
    call in the process warns (once: what runs instead and the fix); ``warn`` adds the
    binary layers' own message."""
    global _WARNED
    try:
        load_extension()
    except CompactnnError as exc:
        if warn:
            warnings.warn(f"{exc} Using the int8 kernels instead.", stacklevel=user_stacklevel())
        if not _WARNED:
            _WARNED = True
            warnings.warn(_NOTICE, stacklevel=user_stacklevel())
        return False
    return True


def loaded():
    """The extension if it is already built and loaded, else None (never compiles: for the
    fused elementwise ops that have a PyTorch fallback)."""
    return _EXT


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack the last dimension of a 0/1 tensor into ``int64`` words, 64 bits each.

    Bit ``i`` of word ``j`` holds element ``64 * j + i``; the last word is zero-padded.
    Returns shape ``(*bits.shape[:-1], ceil(C / 64))``.
    """
    b = bits.detach().to(torch.uint8).cpu().numpy()
    c = b.shape[-1]
    words = (c + 63) // 64
    pad = np.zeros((*b.shape[:-1], words * 64), dtype=np.uint8)
    pad[..., :c] = b
    packed = np.packbits(pad, axis=-1, bitorder="little")  # (..., words * 8) bytes
    return torch.from_numpy(packed.view("<u8").view(np.int64).copy())


def pack_weight(weight_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``(O, C, KH, KW)`` weight bits (1 = +1) for :func:`bitconv2d`.

    Returns the words ``(KH * KW * CW, OP)`` (``OP``: ``O`` rounded up to 16, extra columns
    zero) and the popcount of each tap's words ``(KH * KW, OP)`` (the padding correction).
    """
    o, _, kh, kw = weight_bits.shape
    words = pack_bits(weight_bits.permute(0, 2, 3, 1))  # (O, KH, KW, CW)
    cw = words.shape[-1]
    op = -(-o // OUT_BLOCK) * OUT_BLOCK
    wt = torch.zeros(kh * kw * cw, op, dtype=torch.int64)
    wt[:, :o] = words.reshape(o, kh * kw * cw).t()
    ones = weight_bits.reshape(o, -1, kh * kw).sum(dim=1).t()  # (T, O) set bits per tap
    wpc = torch.zeros(kh * kw, op, dtype=torch.int64)
    wpc[:, :o] = ones
    return wt.contiguous(), wpc


class BitConv2d(nn.Module):
    """A prepacked binary convolution: ``sign(x - shift)`` conv ``+-1`` weights.

    Args:
        weight_bits: ``(O, C, KH, KW)`` 0/1 codes (1 = +1).
        stride, padding, dilation: the convolution's geometry (pairs); zero padding.

    ``forward(x, shift, scale=None, bias=None)`` takes float ``(N, C, H, W)`` and returns the
    integer dots as int32, or ``dot * scale + bias`` as float32 when ``scale`` is given
    (``(N, O, OH, OW)``, channels-last memory).

    Example:
        >>> conv = BitConv2d(torch.ones(8, 3, 3, 3), (1, 1), (1, 1), (1, 1))  # doctest: +SKIP
        >>> conv(torch.randn(1, 3, 5, 5), torch.zeros(3)).shape  # doctest: +SKIP
        torch.Size([1, 8, 5, 5])
    """

    deploy_leaf = True

    def __init__(self, weight_bits: torch.Tensor, stride, padding, dilation) -> None:
        super().__init__()
        self.out_channels, self.in_channels, self.kh, self.kw = weight_bits.shape
        self.stride, self.padding = [int(s) for s in stride], [int(p) for p in padding]
        self.dilation = [int(d) for d in dilation]
        wt, wpc = pack_weight(weight_bits)
        self.register_buffer("weight_words", wt)
        self.register_buffer("tap_popcount", wpc)
        load_extension()  # build (or find) it now: a missing compiler fails here, not later

    @property
    def ext(self):
        """The compiled extension (a module: not stored, so the layer deep-copies)."""
        return load_extension()

    def forward(self, x, shift, scale=None, bias=None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise CompactnnError(
                f"BitConv2d expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}."
            )
        xw = self.ext.pack_signs(x.float(), shift.float())  # (N, H, W, CW)
        y = self.ext.bitconv2d(
            xw, self.weight_words, self.tap_popcount, self.in_channels, self.out_channels,
            self.kh, self.kw, self.stride, self.padding, self.dilation, scale, bias,
        )  # fmt: skip
        return y.permute(0, 3, 1, 2)  # (N, OH, OW, O) -> (N, O, OH, OW) channels-last

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel=({self.kh}, {self.kw}), "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )


def bitconv2d(x_pm1: torch.Tensor, w_pm1: torch.Tensor, stride=1, padding=0, dilation=1):
    """Integer convolution of ``+-1`` tensors on the popcount kernel (int32, NCHW values).

    ``x_pm1``: ``(N, C, H, W)``; ``w_pm1``: ``(O, C, KH, KW)``; both hold only ``+-1``
    (``>= 0`` counts as +1). Equal to ``F.conv2d(x_pm1, w_pm1, ...)`` on exact integers.

    Example:
        >>> y = bitconv2d(torch.ones(1, 70, 4, 4), torch.ones(2, 70, 3, 3), padding=1)
        >>> int(y[0, 0, 1, 1]), int(y[0, 0, 0, 0])  # 9 taps and 4 valid taps of 70 channels
        (630, 280)
    """

    def pair(v):
        return [v, v] if isinstance(v, int) else list(v)

    conv = BitConv2d((w_pm1 >= 0), pair(stride), pair(padding), pair(dilation))
    return conv(x_pm1, torch.zeros(x_pm1.shape[1]))
