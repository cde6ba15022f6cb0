"""Reading a Hugging Face model directory of safetensors shards one block at a time.

The model skeleton is built with every parameter on the ``meta`` device (no weight memory;
buffers such as rotary frequencies stay real, being small and computed at construction),
then :func:`materialize` gives a sub-module its weights from the shards when its turn comes
(memory-mapped reads of just its tensors) and :func:`release` puts it back on ``meta``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from compactnn._optional import require
from compactnn.errors import CompactnnError
from compactnn.export.fs import hf_weights_file, sha256_file
from compactnn.export.user_files import check_regular, index_weight_map, read_regular_bytes
from compactnn.streaming.memory import trim

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_RESAVE = "save the model again with save_pretrained(folder, safe_serialization=True)."


class ShardSet:
    """The tensors of a model directory: name -> shard file, read on demand.

    Args:
        root: a directory with ``config.json`` and ``model.safetensors`` or sharded
            ``model-0000x-of-0000y.safetensors`` files with their index.

    Example:
        >>> shards = ShardSet("models/llama")  # doctest: +SKIP
        >>> shards.read(["model.norm.weight"])["model.norm.weight"].shape  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not (self.root / "config.json").is_file():
            raise CompactnnError(
                f"{str(self.root)!r} is not a Hugging Face model directory (no config.json): "
                "streamed compression (max_memory=) takes a directory written by "
                "save_pretrained(..., safe_serialization=True)."
            )
        index, single = self.root / INDEX, self.root / SINGLE
        if os.path.lexists(single):  # transformers reads it first, never the index beside it
            check_regular(single, _RESAVE)  # a FIFO would block safe_open forever
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        elif os.path.lexists(index):
            weight_map = index_weight_map(index, _RESAVE)
        else:
            raise CompactnnError(
                f"{str(self.root)!r} holds no safetensors weights ({INDEX} or {SINGLE}); "
                "streamed compression reads safetensors shards only."
            )
        for file in sorted(set(weight_map.values())):  # before any is opened (FIFOs block)
            check_regular(self.root / file, f"{INDEX} names it as a shard; {_RESAVE}")
        self.weight_map: dict[str, str] = weight_map

    def source(self) -> dict[str, str]:
        """The artifact's record of the float model (header ``extra.source``): information
        for people, the same record the command line's whole-model ``compress`` writes for a
        Hugging Face directory (its resolved path and the SHA-256 of the file that
        identifies its weights), so a streamed artifact equals the whole-model one."""
        record = {"kind": "Hugging Face directory", "model": str(self.root.resolve())}
        weights = hf_weights_file(self.root)
        if weights is not None:
            record["weights_sha256"] = sha256_file(weights)
        return record

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each shard opened once (memory-mapped, then closed)."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise CompactnnError(
                f"{str(self.root)!r} lacks the tensors {missing[:4]}: the shards do not match "
                "config.json."
            )
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            check_regular(self.root / file, _RESAVE)  # replaced since __init__: still no FIFO
            with safe_open(str(self.root / file), framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out

    def fingerprint(self) -> str:
        """SHA-256 over ``config.json``, the weight map, and each shard's size, modification
        time and safetensors header (not the weight bytes: hashing them would read the model
        once more)."""
        h = hashlib.sha256(read_regular_bytes(self.root / "config.json", _RESAVE))
        h.update(json.dumps(self.weight_map, sort_keys=True).encode())
        for file in sorted(set(self.weight_map.values())):
            p = self.root / file
            check_regular(p, _RESAVE)
            st = p.stat()
            h.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never waits on a FIFO
            with open(fd, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100_000_000)))
        return h.hexdigest()


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lives on ``meta`` (buffers stay real)."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(root: str | os.PathLike) -> nn.Module:
    """The model class ``config.json`` names, built with its parameters on ``meta``.

    The class is chosen as ``compactnn compress DIR`` chooses it (the config's first
    ``architectures`` entry, else ``AutoModel``); no remote code runs.
    """
    transformers = require("transformers", "hf")
    from compactnn.export.hf import remote_code_refusal, transformers_model_class

    if refusal := remote_code_refusal(Path(root)):  # code in the folder: never substituted
        raise refusal
    try:
        config = transformers.AutoConfig.from_pretrained(str(root), trust_remote_code=False)
    except Exception as exc:
        raise CompactnnError(f"cannot read the config in {str(root)!r}: {exc}") from exc
    arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    cls = transformers_model_class(arch)
    with params_on_meta():
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    return model.eval()


def _check_float32(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and t.dtype != torch.float32:
            raise CompactnnError(
                f"shard tensor {name!r} is {t.dtype}; compactnn compresses float32 weights: "
                "save the model in float32 (model.float().save_pretrained(...))."
            )


def materialize(module: nn.Module, prefix: str, shards: ShardSet) -> None:
    """Give ``module`` (named ``prefix`` in the model) its weights from the shards."""
    keys = list(module.state_dict(keep_vars=True))
    names = [f"{prefix}.{k}" if prefix else k for k in keys]
    tensors = shards.read(names)
    _check_float32(tensors)
    state = {k: tensors[n] for k, n in zip(keys, names, strict=True)}
    module.load_state_dict(state, strict=True, assign=True)


def materialize_outside(model: nn.Module, prefix: str, shards: ShardSet) -> None:
    """Give every tensor outside the blocks (named ``prefix``) its weights; ties restored."""
    keys = [
        k
        for k in model.state_dict(keep_vars=True)
        if not k.startswith(prefix + ".") and k in shards
    ]
    tensors = shards.read(keys)
    _check_float32(tensors)
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [
        n
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_meta and not n.startswith(prefix + ".")
    ]
    if left:
        raise CompactnnError(
            f"{str(shards.root)!r} lacks the tensors {left[:4]}: the shards do not match "
            "config.json."
        )


def release(module: nn.Module) -> None:
    """Move ``module``'s parameters and buffers to ``meta``, freeing their memory."""
    module.to("meta")
    trim()
