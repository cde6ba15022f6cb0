"""Shared by the multi-process training tests: run a script as ``world`` gloo ranks the way
``torchrun`` would start them (``WORLD_SIZE``, ``RANK``, ``MASTER_PORT``...), one thread each."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(code: str, world: int, argv: Callable[[int], list[str]], timeout: int = 180) -> None:
    """``python -c code *argv(rank)`` for each rank (a plain process when ``world`` is 1);
    fails with the end of a rank's stderr when it exits nonzero."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        if world > 1:
            env |= {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
            env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-c", code, *argv(rank)]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
