"""``compactnn.train`` across processes: torch.distributed with DistributedDataParallel.

Run the same script under ``torchrun --nproc-per-node N script.py``: ``train`` finds
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment, joins the process group (gloo on
CPU, NCCL on CUDA; or uses one the script already initialised), wraps the model in
``DistributedDataParallel`` and gives each rank its share of every batch.

**Batch and learning-rate rule.** The recipe's ``batch_size`` is the *global* batch: every
rank draws the same seeded permutation, cuts the same global batch, and keeps the slice
``rank`` of its ``world_size`` near-equal slices (:func:`rank_slice`). DDP averages the
gradients over ranks, so one step sees the gradient of the mean loss over the global batch,
as a single process does: the learning rate stays as the recipe says, whatever the number of
processes (exactly so when ``world_size`` divides the batch; a remainder makes the slices
differ by one sample, and the average of the slice means then weighs samples slightly
unevenly). Batch-norm statistics are per rank (each sees its slice), the one known source of
difference from the single-process run besides float summation order.

Every rank gets at least one sample of every batch: a ``batch_size`` (or a loader's) smaller
than ``world_size`` is refused before training, and an epoch's last batch with fewer samples
than ranks is dropped, said once (:mod:`compactnn.training.batch_norm`, which asks two per
rank for a batch norm that needs them). Pass the global data: a ``DataLoader`` whose
``DistributedSampler`` already splits it per rank is refused (each rank would train on
``1/world_size`` of its part).

Rank 0 alone shows progress (the bar's numbers summed over the ranks, as the epoch's line),
prints, warns, writes the log and the checkpoints; every rank reads a checkpoint to resume,
so all continue from the same state.

``distributed="fsdp2"`` shards the student instead of replicating it
(:mod:`compactnn.training.fsdp`): same batch rule, same checkpoints (whole tensors, gathered
from every rank), same frozen model.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from compactnn.core.device import check_device
from compactnn.errors import CompactnnError
from compactnn.launch_env import env_rank
from compactnn.training import fsdp

STRATEGIES = ("ddp", "fsdp2")
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``world_size`` processes, this one ``rank``, on ``device``;
    ``strategy`` says how the model is spread (``"ddp"`` replicated, ``"fsdp2"`` sharded)."""

    world_size: int = 1
    rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "ddp"

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"cpu"`` -> CPU; ``"cuda"`` -> this rank's GPU (``LOCAL_RANK``)."""
    if device is None:
        return torch.device("cpu")
    dev = check_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    elif dev.type != "cpu":
        raise CompactnnError(f"device={device!r}: train() runs on 'cpu' or 'cuda'.")
    return dev


def resolve_strategy(strategy: str | None) -> str:
    """``None`` -> ``"ddp"``; anything but ``"ddp"``/``"fsdp2"`` is refused."""
    strategy = "ddp" if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise CompactnnError(
            f"distributed={strategy!r}: use 'ddp' (the model replicated on every rank) or "
            "'fsdp2' (its parameters sharded over the ranks)."
        )
    return strategy


def detect(device: str | torch.device | None = None, strategy: str | None = None) -> DistEnv:
    """The distributed environment: joins the process group ``torchrun`` describes.

    Example:
        >>> detect().world_size  # a plain python process
        1
    """
    dev = resolve_device(device)
    strategy = resolve_strategy(strategy)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_world_size(), dist.get_rank(), dev, strategy)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(1, 0, dev, strategy)
    if not dist.is_available():
        raise CompactnnError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    atexit.register(_leave_group)  # joined here, so left here (see _leave_group)
    return DistEnv(dist.get_world_size(), dist.get_rank(), dev, strategy)


def _leave_group() -> None:
    """Destroy the process group :func:`detect` joined, at interpreter exit.

    Without it the backend's worker threads are torn down during interpreter finalization,
    which can abort the process (``terminate called without an active exception``, exit
    code -6) after a run that succeeded, and ``torchrun`` then reports the job as failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_rank() -> int:
    """This process's rank: its process group's, else ``torchrun``'s ``RANK`` (0 for a
    plain process, or a ``RANK`` without ``WORLD_SIZE``: :func:`~compactnn.launch_env.env_rank`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return env_rank()


def rank0_warnings(fn: _F) -> _F:
    """``fn`` whose warnings rank 0 alone shows: every rank meets the same ones, so the
    other ranks of a distributed run would repeat each once more (they stay silent)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if process_rank() == 0:
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def rank_slice(n: int, world_size: int, rank: int) -> slice:
    """The part of a global batch of ``n`` samples that ``rank`` trains on.

    Example:
        >>> [rank_slice(10, 3, r) for r in range(3)]
        [slice(0, 4, None), slice(4, 7, None), slice(7, 10, None)]
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def shard(env: DistEnv, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a global batch, on the run's device."""
    if env.active:
        s = rank_slice(x.shape[0], env.world_size, env.rank)
        x, y = x[s], y[s]
    return x.to(env.device), y.to(env.device)


def wrap(env: DistEnv, model: nn.Module) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when several processes run, or
    sharded in place with FSDP2 (``strategy="fsdp2"``; then create the optimizer after)."""
    if not env.active:
        return model
    if env.strategy == "fsdp2":
        return fsdp.shard_model(model, env.world_size, env.device)
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def full_state(
    env: DistEnv, model: nn.Module, opt: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``model``'s and ``opt``'s state dicts with whole tensors: under FSDP2 gathered from
    every rank (every rank must call), otherwise the ordinary state dicts."""
    if fsdp.is_sharded(model):
        return fsdp.full_state(model, opt)
    return model.state_dict(), None if opt is None else opt.state_dict()


def load_full_state(
    env: DistEnv,
    model: nn.Module,
    opt: torch.optim.Optimizer | None,
    msd: dict[str, Any],
    osd: dict[str, Any] | None,
) -> None:
    """Load states written by :func:`full_state` (by any strategy) into ``model``/``opt``."""
    if fsdp.is_sharded(model):
        fsdp.load_full_state(model, opt, msd, osd)
        return
    model.load_state_dict(msd)
    if opt is not None and osd is not None:
        opt.load_state_dict(osd)


def plain_model(env: DistEnv, model: nn.Module, device: str | None = None) -> nn.Module:
    """An ordinary module with ``model``'s weights, for ``freeze`` and evaluation, on
    ``device`` (default: the run's): ``model`` itself, or under FSDP2 a copy gathered from
    every rank (collective; ``model`` stays sharded)."""
    if fsdp.is_sharded(model):
        return fsdp.plain_model(model, torch.device(device or env.device))
    return model if device is None else model.to(device)


def sum_over_ranks(env: DistEnv, values: list[float]) -> list[float]:
    """``values`` summed over every rank (the epoch's loss, hits and sample counts)."""
    if not env.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (after rank 0 wrote a checkpoint)."""
    if env.active:
        import torch.distributed as dist

        dist.barrier()
