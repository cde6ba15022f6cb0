"""This process's rank as a launcher such as ``torchrun`` sets it in the environment.

``torchrun`` sets ``RANK`` together with ``WORLD_SIZE`` (and ``LOCAL_RANK``) for every process
it starts. A ``RANK`` alone, or one outside ``0 .. WORLD_SIZE - 1``, was left in a plain shell
by something else (a job scheduler's variable, an old export): the process is then rank 0 of
one, not a silent non-zero rank. Standard library only (the command line asks before torch
loads).
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def env_rank(environ: Mapping[str, str] | None = None) -> int:
    """The launcher's rank of this process: ``RANK`` when ``WORLD_SIZE`` is set beside it and
    the rank is below it; else 0.

    Example:
        >>> env_rank({"RANK": "1", "WORLD_SIZE": "2"})
        1
        >>> env_rank({"RANK": "3"})  # a RANK left in a plain shell
        0
    """
    env = os.environ if environ is None else environ
    rank, world = env.get("RANK", ""), env.get("WORLD_SIZE", "")
    if not (rank.isdigit() and world.isdigit()):
        return 0
    return int(rank) if int(rank) < int(world) else 0
