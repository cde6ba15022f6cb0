"""``compress(model_dir, recipe, max_memory=..., out=...)``: block-streamed compression.

The float model is never whole in memory. Its skeleton is built on ``meta``
(:func:`~compactnn.streaming.shards.build_skeleton`); the tensors outside the repeated blocks
(embeddings, final norm, head) are read; then the ordinary ``compress`` runs on it with a
:class:`~compactnn.engines.sequential.BlockStream` that reads each block from the shards
when the block-sequential engine reaches it and, once quantized, stages its packed tensors
(:mod:`~compactnn.streaming.staging`) and releases it. A full forward pass (the input check,
the layers' execution order) loads and releases each block the same way. The artifact is
assembled from the staged blocks one tensor at a time and committed atomically; its files
are byte-identical to the command line's whole-model ``compactnn compress DIR``, the header
and its digest included (measurements of a run, such as its peak memory, are not saved).
Against ``save(compress(model, ...))`` on a module in Python the one difference is the
header's ``extra.source`` (the model directory and its weights' SHA-256), which a module
passed in Python does not have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import as_batches
from compactnn.core.gptq_solver import CLIP_CHUNK_ELEMENTS
from compactnn.core.modules import is_hf_conv1d, set_module
from compactnn.core.qlayers import make_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.engines.sequential import block_stream, find_blocks
from compactnn.errors import CompactnnError, name_list
from compactnn.export import replace, validate
from compactnn.export.artifact import (
    check_writable,
    header_body,
    info_of,
    pack_model,
    removed_if_failed,
)
from compactnn.export.sparse import sparsify
from compactnn.quant.base import QuantConfig
from compactnn.recipe import Recipe, resolve_recipe
from compactnn.streaming import memory
from compactnn.streaming.shards import (
    ShardSet,
    build_skeleton,
    materialize,
    materialize_outside,
    release,
)
from compactnn.streaming.staging import Staging, dtype_of
from compactnn.streaming.tensorfile import write_streamed

STREAMABLE = ("gptq", "awq")  # block-sequential methods that need no whole-stack pass


@dataclasses.dataclass(frozen=True)
class StreamReport:
    """What a streamed run did.

    Args:
        out: the artifact directory.
        digest: the artifact's SHA-256 digest (as ``save`` returns it).
        blocks: number of blocks; resumed_from: the first block this run computed.
        budget_mib: the budget; estimate_mib: the estimate checked against it.
        baseline_mib: resident memory when the run started (interpreter, torch,
            transformers and the model's code, no weights).
        peak_mib: peak resident memory of the process during the run.
        added_peak_mib: ``peak_mib - baseline_mib``, what the budget bounds.
    """

    out: str
    digest: str
    blocks: int
    resumed_from: int
    budget_mib: float
    estimate_mib: float
    baseline_mib: float
    peak_mib: float
    added_peak_mib: float


class ShardStream:
    """The :class:`~compactnn.engines.sequential.BlockStream` of a streamed run."""

    def __init__(self, model, prefix, blocks, shards, staging, on_block) -> None:
        self.model, self.prefix, self.blocks = model, prefix, blocks
        self.shards, self.staging, self.on_block = shards, staging, on_block
        self.hook_loaded: set[int] = set()
        self.finished: set[int] = set()
        self.start = 0
        # the float modules of each block the engine works on: the compress pipeline keeps
        # references to the layers it replaces (its targets), so their weights are released
        # here explicitly, or every finished block would stay resident (memory-mapped)
        self.originals: dict[int, list[nn.Module]] = {}

    def name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def onload(self, index: int, block: nn.Module) -> None:
        if any(p.is_meta for p in block.parameters()):
            materialize(block, self.name(index), self.shards)
        self.hook_loaded.discard(index)  # the engine owns it now
        self.originals[index] = list(block.modules())

    def resume(self, q_inps: list, fp_inps: list) -> tuple[int, list, list]:
        done = self.staging.done
        self.start = len(done)
        for i, record in enumerate(done):
            self._quantized_skeleton(i, record["layers"])
        if not done:
            return 0, q_inps, fp_inps
        saved = self.staging.streams()
        q = [saved[f"q.{j}"] for j in range(len(q_inps))]
        fp = [saved[f"fp.{j}"] for j in range(len(fp_inps))]
        return len(done), q, fp

    def _quantized_skeleton(self, index: int, layers: dict[str, Any]) -> None:
        """Block ``index`` as the engine left it, on ``meta``: its layers quantized twins."""
        block = self.blocks[index]
        release(block)
        self.hook_loaded.discard(index)
        head = self.name(index) + "."
        for full, entry in layers.items():
            local = full.removeprefix(head)
            wspec = QuantSpec.from_dict(entry["weight_spec"])
            aspec = QuantSpec.from_dict(entry["act_spec"]) if entry["act_spec"] else None
            with torch.device("meta"):
                q = make_quant_layer(block.get_submodule(local), wspec, aspec)
            set_module(block, local, q)
        self.finished.add(index)

    def finish(self, index: int, block: nn.Module, q_inps: list, fp_inps: list) -> None:
        head = self.name(index) + "."
        tensors, layers, aliases, extra = pack_model(block)
        if extra:
            raise CompactnnError("streamed compression cannot quantize embeddings in blocks.")
        tensors = {head + k: t for k, t in tensors.items()}
        layers = {head + k: v for k, v in layers.items()}
        aliases = {head + k: head + v for k, v in aliases.items()}
        tensors, sparse = sparsify(tensors, layers, self.model)
        streams = {f"q.{j}": t for j, t in enumerate(q_inps)}
        streams |= {f"fp.{j}": t for j, t in enumerate(fp_inps)}
        record = {"layers": layers, "aliases": aliases, "sparse": sparse}
        self.staging.commit_block(index, tensors, record, streams)
        for module in self.originals.pop(index, []):
            module.to("meta")
        release(block)
        self.finished.add(index)
        if self.on_block is not None:
            self.on_block(index)

    def install_hooks(self) -> list:
        """Forward hooks that load a float block for a whole-model pass and release it."""

        def pre(index: int, block: nn.Module, _args) -> None:
            if index in self.finished:
                raise CompactnnError(
                    "this recipe runs the whole model after quantizing its blocks; streamed "
                    f"compression supports weight-only {', '.join(STREAMABLE)} recipes."
                )
            if any(p.is_meta for p in block.parameters()):
                materialize(block, self.name(index), self.shards)
                self.hook_loaded.add(index)

        def post(index: int, block: nn.Module, _args, _out) -> None:
            if index in self.hook_loaded:
                release(block)
                self.hook_loaded.discard(index)

        handles = []
        for i, b in enumerate(self.blocks):
            handles.append(b.register_forward_pre_hook(lambda m, a, i=i: pre(i, m, a)))
            handles.append(b.register_forward_hook(lambda m, a, o, i=i: post(i, m, a, o)))
        return handles


def no_kv_cache(model: nn.Module) -> list:
    """A hook that runs every whole-model pass with ``use_cache=False`` (returned in a list).

    Hugging Face causal LMs default to ``use_cache=True``: the input check's full pass would
    keep every block's keys and values until its end (224 MiB on a 28-block Llama at 8 x 128
    tokens), and the outputs are the same without them. ``model.config`` is left as it is:
    the artifact's header records it.
    """
    if "use_cache" not in inspect.signature(model.forward).parameters:
        return []

    def pre(_m, args, kwargs):
        return args, {**kwargs, "use_cache": False}

    return [model.register_forward_pre_hook(pre, with_kwargs=True)]


def _check_recipe(recipe: Recipe) -> None:
    for step in recipe.steps:
        config = step.config
        if step.method not in STREAMABLE or not isinstance(config, QuantConfig):
            raise CompactnnError(
                f"streamed compression (max_memory=) runs the block-sequential methods "
                f"{', '.join(STREAMABLE)}; recipe step {step.method!r} is not one: use a recipe "
                "such as w4-g128-gptq, or compress without max_memory."
            )
        if config.act is not None:
            raise CompactnnError(
                f"streamed compression runs weight-only recipes; {recipe.name!r} quantizes "
                "activations too (their ranges need a pass through the whole quantized "
                "model): use e.g. w4-g128-gptq, or compress without max_memory."
            )


def _fingerprint(shards: ShardSet, recipe: Recipe, batches: list, seed: int, ignore) -> str:
    h = hashlib.sha256(shards.fingerprint().encode())
    h.update(recipe.to_yaml().encode())
    h.update(repr((seed, sorted(ignore))).encode())

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(batches)
    return h.hexdigest()


def _estimate(model: nn.Module, prefix: str, blocks: nn.ModuleList, batches: list) -> int:
    block = blocks[0]
    block_bytes = sum(p.numel() * 4 for p in block.parameters())
    widths = [m.in_features for m in block.modules() if isinstance(m, nn.Linear)]
    wide = max([m.out_features for m in block.modules() if isinstance(m, nn.Linear)] + [1])
    outside = sum(
        p.numel() * 4 for n, p in model.named_parameters() if not n.startswith(prefix + ".")
    )
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or max(widths)
    tokens = [_tokens(b) for b in batches] or [1]
    act = sum(tokens) * hidden * 4
    # the clip search holds about four float32 temporaries of its chunk at once
    workspace = 4 * 4 * CLIP_CHUNK_ELEMENTS
    return memory.block_need(block_bytes, widths, act, max(tokens) * wide * 4, outside, workspace)


def _tokens(batch: Any) -> int:
    t = batch.get("input_ids") if isinstance(batch, dict) else batch
    if isinstance(t, (tuple, list)):
        t = t[0]
    return t.numel() if isinstance(t, torch.Tensor) else 1


def compress_streamed(
    model_dir: str | os.PathLike,
    recipe: str | Recipe,
    calib_data: Any,
    *,
    max_memory: str | int,
    out: str | os.PathLike | None,
    compress_model: Callable[..., nn.Module],
    seed: int = 0,
    progress: bool = True,
    ignore: Sequence[str] = (),
    force: bool = False,
    on_block: Callable[[int], None] | None = None,
) -> StreamReport:
    """Compress a Hugging Face model directory block by block within ``max_memory``.

    Args:
        model_dir: ``config.json`` plus safetensors shards (``save_pretrained``).
        recipe: a weight-only GPTQ or AWQ recipe (``"w4-g128-gptq"``).
        calib_data: calibration batches, as ``compress`` takes them.
        max_memory: what the run may add to the process's resident memory (``"512MiB"``).
        out: the artifact directory; a staging folder ``<out>.staging`` beside it holds the
            finished blocks until the artifact is committed, and lets a rerun resume.
        compress_model: ``compactnn.api``'s compress body (passed in: streaming sits below
            the API layer).
        seed, progress, ignore: as for ``compress``.
        force: replace an artifact already in ``out``.
        on_block: called with each block's index once it is staged.

    Returns:
        A :class:`StreamReport` (digest, peak resident memory, ...).

    Raises:
        CompactnnError: not a safetensors model directory, a recipe that cannot stream, a
            staging folder of another run, or a budget below the estimated need of one block.

    Example:
        >>> compactnn.compress("llama/", "w4-g128-gptq", calib_data=ids,
        ...                    max_memory="512MiB", out="out/llama-w4")  # doctest: +SKIP
    """
    if out is None:
        raise CompactnnError("max_memory= writes the artifact as it goes: pass out=<directory>.")
    budget = memory.parse_memory(max_memory)
    out_path = check_writable(out, force, what="out")
    shards = ShardSet(model_dir)
    recipe = resolve_recipe(recipe)
    _check_recipe(recipe)
    memory.fixed_mmap_threshold()  # first: the skeleton's construction allocates every weight
    model = build_skeleton(model_dir)  # imports the model's code; holds no weights
    convs = [n for n, m in model.named_modules() if is_hf_conv1d(m)]
    if convs:  # the engine turns them into Linear layers, which needs their values
        raise CompactnnError(
            f"max_memory: {type(model).__name__} has GPT-2 Conv1D layers "
            f"({name_list(convs, 3)}), which streamed compression does not convert yet; "
            "compress it without max_memory (--max-memory), which handles them."
        )
    memory.trim()
    memory.reset_peak()
    baseline = memory.rss()
    prefix, blocks = find_blocks(model)
    batches = as_batches(calib_data)
    estimate = _estimate(model, prefix, blocks, batches)
    if estimate > budget:
        raise CompactnnError(
            f"max_memory={max_memory!r} ({budget / memory.MIB:.0f} MiB) is below the "
            f"{estimate / memory.MIB:.0f} MiB one block of this model needs with its "
            "calibration activations and solver work space: raise max_memory or pass fewer "
            "or shorter calibration batches."
        )
    materialize_outside(model, prefix, shards)
    staging = Staging(
        Path(str(out_path) + ".staging"),
        _fingerprint(shards, recipe, batches, seed, ignore),
        len(blocks),
    )
    stream = ShardStream(model, prefix, blocks, shards, staging, on_block)
    handles = [*stream.install_hooks(), *no_kv_cache(model)]
    try:
        with block_stream(stream):
            qmodel = compress_model(
                model, recipe, batches, seed=seed, progress=progress, inplace=True, ignore=ignore
            )
    finally:
        for h in handles:
            h.remove()
    if len(staging.done) != len(blocks):
        raise CompactnnError("the recipe left blocks unquantized; streamed compression stops.")
    # the record the whole-model command line run adds after compress (same key order)
    qmodel._compactnn.setdefault("extra", {})["source"] = shards.source()
    digest = save_streamed(qmodel, out_path, prefix, blocks, staging, force=force)
    staging.remove()
    peak = memory.peak_rss()
    mib = memory.MIB
    return StreamReport(
        out=str(out_path),
        digest=digest,
        blocks=len(blocks),
        resumed_from=stream.start,
        budget_mib=round(budget / mib, 1),
        estimate_mib=round(estimate / mib, 1),
        baseline_mib=round(baseline / mib, 1),
        peak_mib=round(peak / mib, 1),
        added_peak_mib=round((peak - baseline) / mib, 1),
    )


def _ordered(d: dict[str, Any], order: list[str]) -> dict[str, Any]:
    rank = {k: i for i, k in enumerate(order)}
    return dict(sorted(d.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def save_streamed(
    model: nn.Module,
    out: Path,
    prefix: str,
    blocks: nn.ModuleList,
    staging: Staging,
    force: bool | None = None,
) -> str:
    """Write the artifact of a streamed model: the blocks from ``staging``, the rest from
    ``model``; the same files ``save`` writes for the whole model. Returns the digest."""
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList())  # pack what lies outside the (released) blocks
    try:
        rest, layers, aliases, emb_extra = pack_model(model)
        rest, sparse = sparsify(rest, layers, model)
    finally:
        setattr(parent, attr, blocks)
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in rest.items()}
    where: dict[str, int] = {}
    for i, record in enumerate(staging.done):
        layers |= record["layers"]
        aliases |= record["aliases"]
        sparse |= record["sparse"]
        for k, (dtype, shape) in record["tensors"].items():
            specs[k] = (dtype_of(dtype), tuple(shape))
            where[k] = i
    module_order = [n for n, _ in model.named_modules()]
    keys = list(model.state_dict(keep_vars=True))
    layers = _ordered(layers, module_order)
    aliases = _ordered(aliases, keys)
    sparse = _ordered(sparse, [f"{n}.weight.packed" for n in layers] + keys)
    body = header_body(model, layers, aliases, sparse, emb_extra)
    handles: dict[int, Any] = {}

    def fetch(name: str) -> torch.Tensor:
        if name in rest:
            return rest[name]
        from safetensors import safe_open

        i = where[name]
        if i not in handles:
            handles.clear()  # one staged block open at a time
            handles[i] = safe_open(str(staging.block_file(i)), framework="pt")
        return handles[i].get_tensor(name)

    writers = {"tensors": lambda p: write_streamed(p, specs, fetch)}
    if (recipe := info_of(model).get("recipe")) is not None:
        text = recipe.to_yaml().encode("utf-8")
        writers["recipe"] = lambda p: Path(p).write_bytes(text)

    def make_header(files: dict) -> dict:
        header = {**body, "files": files, "digest": ""}
        header["digest"] = validate.header_digest(header)
        validate.check_header(header)
        return header

    with removed_if_failed(out):  # a failed save leaves no folder it created
        out.mkdir(parents=True, exist_ok=True)
        return replace.write_artifact(out, writers, make_header, force=force)["digest"]
