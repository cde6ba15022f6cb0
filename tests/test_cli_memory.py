"""Running out of memory is one ``error: out of memory ...`` line with status 2, naming the
allocation that failed and the fixes; any other RuntimeError stays a traceback (a bug)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compactnn import cli
from compactnn.commands import recipes
from tests._cli import run_cli

# What torch printed under `ulimit -v` (tester T1, compress tvnets:resnet18 at 3.8 GB).
ALLOCATOR = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
    "memory: you tried to allocate 9437184 bytes. Error code 12 (Cannot allocate memory)"
)
NOT_ENOUGH = (
    "[enforce fail at alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you "
    "tried to allocate 4718592 bytes."
)
MMAP = "unable to mmap 44775880 bytes from file <w.safetensors>: Cannot allocate memory (12)"
FIXES = ("ulimit -v", "fewer threads", "smaller --data", "more memory")
PETABYTE = 2**50  # beyond any machine's address space: the allocation fails for real


def run_raising(monkeypatch, capsys, fail) -> tuple[int, str]:
    """``compactnn recipes`` with its run replaced by ``fail``: the status and stderr."""
    monkeypatch.setattr(recipes, "run", lambda args: fail())
    code, _out, err = run_cli(capsys, "recipes")
    return code, err


def _raise(exc: BaseException):
    def fail():
        raise exc

    return fail


@pytest.mark.parametrize(
    ("fail", "detail"),
    [
        (
            lambda: torch.empty(PETABYTE, dtype=torch.uint8),
            "an allocation of 1024.0 TiB (1,125,899,906,842,624 bytes)",
        ),
        (lambda: np.empty(PETABYTE, dtype=np.uint8), "Unable to allocate 1.00 PiB"),
        (_raise(RuntimeError(ALLOCATOR)), "an allocation of 9.0 MiB (9,437,184 bytes) failed"),
        (_raise(RuntimeError(NOT_ENOUGH)), "an allocation of 4.5 MiB (4,718,592 bytes) failed"),
        (_raise(RuntimeError(MMAP)), "unable to mmap 44775880 bytes from file <w.safetensors>"),
        (_raise(MemoryError()), None),  # a bare one: importing sympy at 3.3 GB
        (_raise(OSError(errno.ENOMEM, "Cannot allocate memory")), "Cannot allocate memory"),
        (_raise(OSError(errno.ENOMEM, "Cannot allocate memory", "o/m")), "'o/m': Cannot alloc"),
    ],
)
def test_out_of_memory_is_one_error_line_with_status_2(monkeypatch, capsys, fail, detail):
    code, err = run_raising(monkeypatch, capsys, fail)
    assert code == cli.EXIT_USER_ERROR == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: out of memory")
    assert "compactnn recipes needed more memory than this process may use" in err
    assert all(fix in err for fix in FIXES), err
    if detail is None:
        assert err.startswith("error: out of memory: compactnn recipes"), err
    else:
        assert f"({detail}" in err, err


def test_numpy_names_the_array_that_did_not_fit(monkeypatch, capsys):
    code, err = run_raising(monkeypatch, capsys, lambda: np.zeros((2**25, 2**25), np.float32))
    assert code == 2
    assert "out of memory (Unable to allocate 4.00 PiB for an array with shape" in err, err


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("shape '[2, 3]' is invalid for input of size 5"),
        RuntimeError("could not allocate the output buffer: bad size"),  # no allocator words
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        OSError(errno.EIO, "Input/output error", "w.safetensors"),
    ],
)
def test_other_errors_keep_their_traceback(monkeypatch, capsys, exc):
    with pytest.raises(type(exc)) as raised:
        run_raising(monkeypatch, capsys, _raise(exc))
    assert raised.value is exc


def test_a_plugin_out_of_memory_at_import_is_memory_not_the_plugin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "memory_plug.py").write_text("raise MemoryError\n")
    code, _out, err = run_cli(capsys, "recipes", "--plugin", "memory_plug")
    assert code == 2
    assert err.startswith("error: out of memory: compactnn recipes needed"), err
    assert "failed while being imported" not in err


def test_compress_out_of_memory_reading_weights_blames_memory(tmp_path, monkeypatch, capsys):
    """T1's 3.6 GB cap: the weights file was called unreadable; memory ran out."""
    import safetensors.torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "memory_net.py").write_text(
        "from torch import nn\n\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 2))\n"
    )
    save_file(nn.Sequential(nn.Linear(4, 2)).state_dict(), tmp_path / "w.safetensors")
    np.save(tmp_path / "x.npy", np.zeros((8, 4), np.float32))

    def enomem(path, *args, **kwargs):
        raise MemoryError("Cannot allocate memory (os error 12)")

    monkeypatch.setattr(safetensors.torch, "load_file", enomem)
    argv = ["compress", "memory_net:make", "--weights", "w.safetensors", "-d", "x.npy"]
    code, _out, err = run_cli(capsys, *argv, "-r", "w8a8", "-o", "art")
    assert code == 2
    assert err.startswith(
        "error: out of memory (reading 'w.safetensors': Cannot allocate memory (os error 12)): "
        "compactnn compress needed"
    ), err
    assert "not a readable safetensors file" not in err
    assert not (tmp_path / "art").exists()


def test_an_open_progress_bar_ends_its_line_before_the_error(monkeypatch, capsys):
    """T1 at 3.8 GB: the error line was printed at the end of "calibrating activations"."""
    from tqdm import tqdm

    import compactnn.commands._common  # noqa: F401 - loaded, as by every computing command

    def fail():
        bar = tqdm(total=3, desc="calibrating activations")  # kept open by the traceback
        bar.update(1)
        raise MemoryError

    code, err = run_raising(monkeypatch, capsys, fail)
    assert code == 2
    assert "calibrating activations" in err
    assert err.split("\n")[-2].startswith("error: out of memory: compactnn recipes"), repr(err)


def test_size_text():
    assert cli.size_text(9437184) == "9.0 MiB (9,437,184 bytes)"
    assert cli.size_text(3 * 2**30) == "3.0 GiB (3,221,225,472 bytes)"
    assert cli.size_text(2048) == "2.0 KiB (2,048 bytes)"
    assert cli.size_text(12) == "12 bytes"


def test_deploy_backend_search_passes_out_of_memory_through(monkeypatch):
    """deploy's backend search re-raises running out of memory (no other backend fits
    either) instead of calling it an internal error of one backend."""
    import torch

    import compactnn
    from compactnn.deployment import api

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9")

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
    x = torch.randn(4, 1, 8, 8)
    q = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    monkeypatch.setattr(api, "_build", no_memory)
    try:
        compactnn.deploy(q, example=x)
    except RuntimeError as exc:
        assert "DefaultCPUAllocator" in str(exc)
    else:
        raise AssertionError("deploy did not raise")
