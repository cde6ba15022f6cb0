"""Streamed compression under a memory budget: the artifact equals the whole-model one."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

import compactnn
from compactnn.api import _compress
from compactnn.cli import main
from compactnn.errors import CompactnnError
from compactnn.streaming import compress_streamed, parse_memory
from compactnn.streaming.tensorfile import write_streamed

transformers = pytest.importorskip("transformers")

RECIPE = "w4-g32-gptq"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved in several safetensors shards."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ids_file(ids, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ids") / "ids.safetensors"
    save_file({"x": ids}, path)
    return path


@pytest.fixture(scope="module")
def whole(llama_dir, ids_file, tmp_path_factory) -> Path:
    """The artifact written without a budget, from the whole model, by the command line
    (``compactnn compress DIR``, which records the model directory in ``extra.source``)."""
    out = tmp_path_factory.mktemp("whole") / "a"
    argv = ["compress", str(llama_dir), "--recipe", RECIPE, "--data", str(ids_file)]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    return out


def _same_artifact(a: Path, b: Path) -> None:
    """Every file byte-identical, the digest included (measured peak memory is not saved)."""
    for name in ("model.safetensors", "recipe.yaml", "compactnn.json"):
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def _stream(llama_dir, ids, out, **kwargs):
    kwargs.setdefault("max_memory", "512MiB")
    return compress_streamed(
        llama_dir, RECIPE, ids, out=out, compress_model=_compress, progress=False, **kwargs
    )


def test_tensorfile_bytes_equal_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.packed": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),
        "z": torch.randn(2, generator=g).half(),
        "c.zero": torch.randint(-8, 7, (4, 2), generator=g).to(torch.int8),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3, dtype=torch.int64),
    }
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    buf = tmp_path / "x.safetensors"
    write_streamed(buf, specs, tensors.__getitem__)
    assert buf.read_bytes() == save_bytes(tensors, metadata={"format": "pt"})


def test_parse_memory():
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory(4096) == 4096
    with pytest.raises(CompactnnError, match="max_memory"):
        parse_memory("lots")


def test_streamed_artifact_equals_whole_model(llama_dir, ids, whole, tmp_path):
    with pytest.warns(UserWarning):
        report = compactnn.compress(
            str(llama_dir), RECIPE, calib_data=ids, max_memory="512MiB", out=tmp_path / "b"
        )
    _same_artifact(whole, tmp_path / "b")
    assert not (tmp_path / "b.staging").exists()
    assert report.blocks == 2 and report.resumed_from == 0
    assert report.peak_mib >= report.baseline_mib > 0 and report.added_peak_mib >= 0
    assert report.digest == compactnn.artifact_digest(tmp_path / "b")
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    a, b = compactnn.load(whole), compactnn.load(tmp_path / "b")
    assert torch.equal(a(x).logits, b(x).logits)


def test_cli_streamed_artifact_equals_cli_whole_model(llama_dir, ids_file, whole, tmp_path):
    """``--max-memory`` records the same ``extra.source`` as the whole-model command: every
    byte equal, the header and its digest included (it once lacked the source record)."""
    out = tmp_path / "b"
    argv = ["compress", str(llama_dir), "--recipe", RECIPE, "--data", str(ids_file)]
    assert main([*argv, "--out", str(out), "--no-progress", "--max-memory", "512MiB"]) == 0
    source = json.loads((out / "compactnn.json").read_text())["extra"]["source"]
    assert source["kind"] == "Hugging Face directory"
    assert source["model"] == str(llama_dir.resolve()) and len(source["weights_sha256"]) == 64
    _same_artifact(whole, out)
    assert compactnn.artifact_digest(out) == compactnn.artifact_digest(whole)


def test_resume_after_interruption_is_identical(llama_dir, ids, whole, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_block_0(i: int) -> None:
        if i == 0:
            raise Stop

    with pytest.warns(UserWarning), pytest.raises(Stop):
        _stream(llama_dir, ids, tmp_path / "b", on_block=stop_after_block_0)
    manifest = json.loads((tmp_path / "b.staging" / "manifest.json").read_text())
    assert len(manifest["done"]) == 1 and not (tmp_path / "b" / "compactnn.json").exists()
    with pytest.raises(CompactnnError, match="another model, recipe"):  # other data: refused
        _stream(llama_dir, ids + 1, tmp_path / "b")
    with pytest.warns(UserWarning):
        report = _stream(llama_dir, ids, tmp_path / "b")
    assert report.resumed_from == 1
    _same_artifact(whole, tmp_path / "b")


def test_refuses_budget_below_one_block(llama_dir, ids, tmp_path):
    with pytest.raises(CompactnnError, match=r"below the \d+ MiB one block"):
        _stream(llama_dir, ids, tmp_path / "b", max_memory="64KiB")
    assert not (tmp_path / "b").exists()


def test_refuses_what_cannot_stream(llama_dir, ids, tmp_path):
    with pytest.raises(CompactnnError, match="weight-only"):
        compactnn.compress(llama_dir, "w4a8-gptq", ids, max_memory="1GiB", out=tmp_path / "b")
    with pytest.raises(CompactnnError, match="block-sequential"):
        compactnn.compress(llama_dir, "w4a8", ids, max_memory="1GiB", out=tmp_path / "b")
    with pytest.raises(CompactnnError, match="out="):
        compactnn.compress(llama_dir, RECIPE, ids, max_memory="1GiB")
    with pytest.raises(CompactnnError, match=r"config\.json"):
        compactnn.compress(tmp_path, RECIPE, ids, max_memory="1GiB", out=tmp_path / "b")
    with pytest.raises(CompactnnError, match="directory"):
        compactnn.compress(torch.nn.Linear(2, 2), RECIPE, ids, max_memory="1GiB", out="x")


def test_refuses_gpt2_conv1d_layers_before_staging(tmp_path):
    """GPT-2's Conv1D layers become Linear ones inside the engine, which needs their values:
    refused in one message, before the staging folder exists (it was a meta-tensor crash)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=64)
    path = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path, max_shard_size="100KB")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(CompactnnError, match=r"Conv1D layers .*without max_memory"):
        compactnn.compress(path, RECIPE, ids, max_memory="1GiB", out=tmp_path / "b")
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.staging").exists()
