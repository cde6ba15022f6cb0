"""The staging folder of a streamed run: finished blocks, the calibration streams, a manifest.

After block ``i`` is quantized its packed tensors go to ``block-<i>.safetensors``, the two
hidden-state streams at block ``i + 1``'s input to ``streams-<i>.safetensors``, and then the
manifest (``manifest.json``, replaced atomically: the commit point) records the block as
done. A restarted run reads the manifest and continues after the last block it lists; a
manifest whose fingerprint (model shards, recipe, calibration data, seed) differs is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from compactnn.errors import CompactnnError
from compactnn.export.fs import atomic_write, atomic_write_text
from compactnn.streaming.tensorfile import write_streamed

MANIFEST = "manifest.json"
VERSION = 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CompactnnError(f"staging manifest names an unknown dtype {name!r}; delete it.")
    return dtype


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` atomically as a safetensors file, one tensor at a time."""
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    atomic_write(path, lambda p: write_streamed(p, specs, tensors.__getitem__))


class Staging:
    """A staging folder bound to one fingerprint.

    Args:
        root: the folder (created when missing).
        fingerprint: identifies the model, recipe, data and seed of the run.
        blocks: number of blocks of the model.

    Raises:
        CompactnnError: the folder holds a manifest of another run.
    """

    def __init__(self, root: Path, fingerprint: str, blocks: int) -> None:
        self.root = root
        self.fingerprint = fingerprint
        manifest = root / MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CompactnnError(f"{manifest} is unreadable ({exc}); delete it.") from exc
            if (
                not isinstance(data, dict)
                or data.get("version") != VERSION
                or data.get("fingerprint") != fingerprint
                or data.get("blocks") != blocks
            ):
                raise CompactnnError(
                    f"the staging folder {str(root)!r} belongs to a run of another model, "
                    "recipe, calibration data or seed: delete it (or choose another out=) to "
                    "start afresh."
                )
            self.manifest: dict[str, Any] = data
        else:
            root.mkdir(parents=True, exist_ok=True)
            self.manifest = {"version": VERSION, "fingerprint": fingerprint, "blocks": blocks}
            self.manifest["done"] = []
            atomic_write_text(manifest, json.dumps(self.manifest))

    @property
    def done(self) -> list[dict[str, Any]]:
        """Per finished block: ``layers``, ``aliases``, ``sparse`` and ``tensors`` specs."""
        return self.manifest["done"]

    def block_file(self, index: int) -> Path:
        return self.root / f"block-{index:05d}.safetensors"

    def commit_block(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        record: dict[str, Any],
        streams: dict[str, torch.Tensor],
    ) -> None:
        """Stage block ``index`` (packed tensors, header entries) and the streams after it."""
        if index != len(self.done):
            raise CompactnnError(f"block {index} finished out of order; delete {self.root}.")
        write_file(self.block_file(index), tensors)
        write_file(self.root / f"streams-{index:05d}.safetensors", streams)
        specs = {k: [dtype_name(t.dtype), list(t.shape)] for k, t in tensors.items()}
        self.done.append({**record, "tensors": specs})
        atomic_write_text(self.root / MANIFEST, json.dumps(self.manifest))
        old = self.root / f"streams-{index - 1:05d}.safetensors"
        old.unlink(missing_ok=True)

    def streams(self) -> dict[str, torch.Tensor]:
        """The streams after the last finished block."""
        from safetensors.torch import load_file

        path = self.root / f"streams-{len(self.done) - 1:05d}.safetensors"
        if not path.is_file():
            raise CompactnnError(f"{path} is missing: delete {self.root} and rerun.")
        return load_file(str(path))

    def remove(self) -> None:
        """Delete the folder (after the artifact is committed)."""
        shutil.rmtree(self.root, ignore_errors=True)
