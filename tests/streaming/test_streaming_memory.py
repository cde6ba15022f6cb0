"""What keeps a streamed run's peak memory stable: no KV cache, the allocator set up first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactnn.api import _compress
from compactnn.models.tiny_hf import tiny_model
from compactnn.streaming import compress_streamed, memory, run

pytest.importorskip("transformers")


def _tiny_llama() -> nn.Module:
    return tiny_model("llama")[0]  # vocab 128


def test_no_kv_cache_keeps_outputs_and_drops_the_cache():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model(ids)
    assert cached.past_key_values is not None  # the default keeps every block's keys/values
    handles = run.no_kv_cache(model)
    assert len(handles) == 1
    try:
        with torch.no_grad():
            plain = model(ids, use_cache=True)  # the hook wins over the caller's flag
    finally:
        for h in handles:
            h.remove()
    assert plain.past_key_values is None
    assert torch.equal(plain.logits, cached.logits)
    assert model.config.use_cache is True  # the config (saved in the header) is untouched


def test_no_kv_cache_leaves_models_without_the_flag():
    assert run.no_kv_cache(nn.Linear(3, 2)) == []


def test_allocator_fixed_before_the_skeleton_is_built(tmp_path, monkeypatch):
    """Building the skeleton allocates every weight once: under glibc's dynamic threshold
    that grew a 1 GiB heap whose reuse made the first block's peak vary by 300 MiB."""
    _tiny_llama().save_pretrained(tmp_path / "m")
    order: list[str] = []
    monkeypatch.setattr(memory, "fixed_mmap_threshold", lambda: order.append("threshold"))

    def skeleton(_root):
        order.append("skeleton")
        raise RuntimeError("stop here")

    monkeypatch.setattr(run, "build_skeleton", skeleton)
    with pytest.raises(RuntimeError, match="stop here"):
        compress_streamed(
            tmp_path / "m",
            "w4-g32-gptq",
            torch.zeros(1, 4, dtype=torch.long),
            max_memory="64MiB",
            out=tmp_path / "out",
            compress_model=_compress,
            progress=False,
        )
    assert order == ["threshold", "skeleton"]
