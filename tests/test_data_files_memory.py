"""Too little memory to read a ``.safetensors`` file is a MemoryError naming the file, not
"not a readable safetensors file"; a damaged file still is one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from compactnn.data_files import read_tensors
from compactnn.errors import CompactnnError, is_out_of_memory


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2, 3)}, path)
    return path


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError("Cannot allocate memory (os error 12)"),  # safetensors' mmap (T1, 3.6 GB)
        RuntimeError(
            "unable to mmap 44775880 bytes from file <w.safetensors>: Cannot allocate memory (12)"
        ),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 24 bytes. Error code 12 (Cannot allocate memory)"
        ),
        OSError(12, "Cannot allocate memory"),
        Exception("Error while deserializing: Cannot allocate memory (os error 12)"),
    ],
)
def test_enomem_reading_safetensors_is_memory_not_a_bad_file(monkeypatch, weights, exc):
    def load_file(path, *args, **kwargs):
        raise exc

    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    with pytest.raises(MemoryError) as raised:
        read_tensors(weights)
    assert str(raised.value).startswith(f"reading {str(weights)!r}: "), raised.value
    assert "Cannot allocate memory" in str(raised.value) or "can't allocate" in str(raised.value)
    assert raised.value.__cause__ is exc
    assert not isinstance(raised.value, CompactnnError)


def test_a_damaged_file_is_still_a_bad_file(weights):
    assert torch.equal(read_tensors(weights)["w"], torch.ones(2, 3))
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CompactnnError, match="is not a readable safetensors file"):
        read_tensors(weights)


READ_UNDER_LIMIT = r"""
import resource, sys
from compactnn.data_files import read_tensors
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 8_000_000, resource.RLIM_INFINITY))
try:
    read_tensors(sys.argv[1])
except MemoryError as exc:
    print("MemoryError:", exc)
"""


def test_a_real_address_space_limit_is_memory(tmp_path):
    """The tester's `ulimit -v`: 32 MiB of weights, 8 MB of address space to spare."""
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(8, 2**20)}, path)
    result = subprocess.run(
        [sys.executable, "-c", READ_UNDER_LIMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"MemoryError: reading {str(path)!r}: "), result.stdout
    assert "Cannot allocate memory" in result.stdout, result.stdout


def test_is_out_of_memory_matches_the_allocator_words_only():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(OSError(12, "Cannot allocate memory"))
    assert not is_out_of_memory(OSError(28, "No space left on device"))
    assert not is_out_of_memory(RuntimeError("unable to mmap 8 bytes from file <x>: (22)"))
    assert not is_out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB"))
