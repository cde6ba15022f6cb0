"""FSDP2 for ``compactnn.train``: the student's parameters sharded over the ranks.

``compactnn.train(..., distributed="fsdp2")`` under ``torchrun`` applies
``torch.distributed.fsdp.fully_shard`` to every training wrapper (``QATLayer``,
``BinaryBlock``, ...: one FSDP unit per quantized layer, its quantizers with it) and then to
the whole student, so each rank stores ``1 / world_size`` of the parameters, gradients and
Adam moments (DTensors sharded along dim 0). Before a wrapper's forward its unit is
all-gathered, so the weight quantizers see whole weights exactly as in one process; after
backward the gradients are reduce-scattered and averaged, so one step takes the gradient of
the mean loss over the global batch, as DDP does.

Kept **replicated** (ordinary parameters, their gradients all-reduced and averaged by a hook):

- scalar parameters (``fully_shard`` refuses 0-dimensional tensors): per-tensor LSQ/PACT
  steps and clips;
- every parameter of a wrapper whose weight quantizer has a ``start_epoch`` hook (INQ, ELQ,
  TSQ, BAP, Sub-bit, binary schedules): those hooks read or rewrite whole weights between
  steps, outside any forward, where FSDP holds only a shard.

Buffers (batch-norm statistics, quantizer state updated in forward) are broadcast from rank 0
before every forward of the student, as DDP does, so every rank holds the same.

Checkpoints and the frozen model use *full* tensors gathered from every rank: a checkpoint
has the same keys and shapes as a single-process or DDP one (the optimizer state keyed by
parameter index), so any of the three resumes any other, and the frozen artifact is built
from an ordinary module exactly as without FSDP.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from compactnn.engines.qat import QATWrapper
from compactnn.errors import CompactnnError

__all__ = [
    "full_state",
    "is_sharded",
    "load_full_state",
    "local_bytes",
    "plain_model",
    "replicated_params",
    "shard_model",
]

# nn.Module bookkeeping and FSDP's own attributes: never copied to the gathered model
_SKIP_ATTRS = frozenset(nn.Module().__dict__) | {"_is_fsdp_managed_module", "_fsdp_use_orig_params"}


@dataclasses.dataclass
class _Sharded:
    """What :func:`shard_model` leaves on the student: an unsharded skeleton (parameters
    on the ``meta`` device) to rebuild an ordinary module from, and the replicated set."""

    template: nn.Module
    replicated: set[nn.Parameter]
    world_size: int


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def replicated_params(model: nn.Module) -> dict[str, str]:
    """``{parameter name: reason}`` for the parameters FSDP2 must not shard."""
    keep: dict[str, str] = {}
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(m, QATWrapper) and hasattr(wq, "start_epoch"):
            why = f"{type(wq).__name__}.start_epoch reads whole weights between steps"
            for pname, _ in m.named_parameters():
                keep.setdefault(f"{name}.{pname}" if name else pname, why)
    for name, p in model.named_parameters():
        if p.dim() == 0:
            keep.setdefault(name, "scalar (fully_shard shards along dim 0)")
    return keep


def _meta_template(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters live on ``meta`` (no memory); state shared."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    qat_state = getattr(model, "_compactnn_qat", None)
    if qat_state is not None:  # recipe and calibration context: shared, not copied
        memo[id(qat_state)] = qat_state
    return copy.deepcopy(model, memo)


def _average_grad_hook(world_size: int):
    import torch.distributed as dist

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)

    return hook


def _broadcast_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (one broadcast per dtype), as DDP does before each
    forward: batch-norm statistics and buffers that quantizers update in their forward
    (LQ-Nets' bases, binary blocks' statistics) stay identical on every rank."""
    import torch.distributed as dist

    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in model.buffers():
        if b.numel():
            groups.setdefault(b.dtype, []).append(b)
    for bufs in groups.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.broadcast(flat, 0)
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
            b.data.copy_(v.view_as(b))


def shard_model(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (one unit per training wrapper, then the root).

    Call it before creating the optimizer: ``fully_shard`` replaces the parameters by
    DTensors. Every rank must call it (a collective).

    Raises:
        CompactnnError: this torch lacks FSDP2, or a layer cannot be sharded (named, with
            its type).
    """
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # pragma: no cover - torch < 2.6
        raise CompactnnError(
            f"distributed='fsdp2' needs torch.distributed.fsdp.fully_shard (torch >= 2.6): "
            f"{exc}. Use distributed='ddp'."
        ) from exc
    template = _meta_template(model)
    names = replicated_params(model)
    params = dict(model.named_parameters())
    keep = {params[n] for n in names}
    hook = _average_grad_hook(world_size)
    for p in keep:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)
    mesh = init_device_mesh(device.type, (world_size,))
    units = [(n, m) for n, m in model.named_modules() if isinstance(m, QATWrapper)]
    for name, m in [*units, ("", model)]:
        if name and all(p in keep for p in m.parameters()):
            continue  # wholly replicated: nothing for FSDP to manage here
        try:
            fully_shard(m, mesh=mesh, ignored_params=keep)
        except (ValueError, RuntimeError, AssertionError, TypeError) as exc:
            raise CompactnnError(
                f"FSDP2 cannot shard layer {name or '<model>'!r} ({type(m).__name__}): {exc}. "
                "Train this model with distributed='ddp' (replicated), or keep the layer "
                "out of the recipe's targets."
            ) from exc
    model.register_forward_pre_hook(lambda m, _args: _broadcast_buffers(m))
    model._compactnn_fsdp = _Sharded(template, keep, world_size)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_compactnn_fsdp", None), _Sharded)


def _full(t: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """The whole tensor on ``device`` (an all-gather for a DTensor: every rank must call)."""
    if isinstance(t, _dtensor()):
        t = t.full_tensor()
    return t.detach().to(device, copy=True)


def full_state(
    model: nn.Module, opt: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Model and optimizer state with whole CPU tensors (collective on a sharded model).

    The same keys and layout as ``model.state_dict()`` / ``opt.state_dict()`` of the
    unsharded model, so single-process, DDP and FSDP2 checkpoints are interchangeable.
    """
    _broadcast_buffers(model)  # rank 0's buffers, as the frozen model's
    msd = {k: _full(v) for k, v in model.state_dict().items()}
    if opt is None:
        return msd, None
    osd = opt.state_dict()
    state = {
        i: {k: _full(v) if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in sorted(osd["state"].items())
    }
    return msd, {"state": state, "param_groups": osd["param_groups"]}


def _like(ref: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (whole) laid out as ``ref``: this rank's shard when ``ref`` is a DTensor."""
    if not isinstance(ref, _dtensor()):
        return value.to(ref.device)
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=ref.device_mesh.device_type, dtype=ref.dtype)
    # every rank holds the same whole tensor (one checkpoint): slice locally, no traffic
    return distribute_tensor(value, ref.device_mesh, ref.placements, src_data_rank=None)


def load_full_state(
    model: nn.Module,
    opt: torch.optim.Optimizer | None,
    msd: dict[str, torch.Tensor],
    osd: dict[str, Any] | None,
) -> None:
    """Load whole-tensor states (from :func:`full_state` or an unsharded run) into a
    sharded ``model`` and its ``opt``."""
    current = model.state_dict()
    model.load_state_dict({k: _like(current[k], v) if k in current else v for k, v in msd.items()})
    if opt is None or osd is None:
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, s in osd["state"].items():
        p = params[int(i)]
        state[i] = {
            k: _like(p, v) if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape else v
            for k, v in s.items()
        }
    opt.load_state_dict({"state": state, "param_groups": osd["param_groups"]})


def _copy_attrs(src: nn.Module, dst: nn.Module) -> None:
    """Python attributes a quantizer changed while training (schedule flags, ``t``)."""
    for k, v in src.__dict__.items():
        if k in _SKIP_ATTRS or k.startswith("__composable_api_state_key"):
            continue
        if isinstance(v, nn.Module | _Sharded) or k == "_compactnn_qat":
            continue
        dst.__dict__[k] = copy.deepcopy(v)
    dst.training = src.training


def plain_model(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """An ordinary module on ``device`` with ``model``'s whole current weights (collective).

    ``model`` keeps training; the result is what ``freeze`` and evaluation take.
    """
    sharded: _Sharded = model._compactnn_fsdp
    _broadcast_buffers(model)  # every rank returns rank 0's model, as DDP's rank 0 does
    state = getattr(sharded.template, "_compactnn_qat", None)
    memo: dict[int, Any] = {} if state is None else {id(state): state}
    plain = copy.deepcopy(sharded.template, memo)
    live = dict(model.named_modules())
    whole: dict[int, nn.Parameter] = {}
    for name, dst in plain.named_modules():
        src = live[name]
        _copy_attrs(src, dst)
        for k, p in src._parameters.items():
            if p is not None and id(p) not in whole:
                whole[id(p)] = nn.Parameter(_full(p, device), requires_grad=p.requires_grad)
            dst._parameters[k] = None if p is None else whole[id(p)]
        for k, b in src._buffers.items():
            dst._buffers[k] = None if b is None else _full(b, device)
    return plain


def local_bytes(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank stores for parameters (its shards) and optimizer state."""
    dt = _dtensor()

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, dt) else t
        return t.numel() * t.element_size()

    out = {"params": sum(nbytes(p) for p in model.parameters())}
    if opt is not None:
        out["optimizer"] = sum(
            nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
        )
    return out
