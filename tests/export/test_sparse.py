"""Sparse storage: bit-exact round trips, the per-tensor choice, sizes on disk."""

import os

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qlayers import quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.errors import ArtifactError
from compactnn.export.reader import read_header
from compactnn.export.sparse import densify, sparsify


def _sparse(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < density, t, torch.zeros_like(t))


def test_float_round_trip_is_bit_exact_including_negative_zero():
    t = _sparse((64, 64), 0.1)
    t[0, 0] = -0.0
    t[0, 1] = float("nan")
    out, index = sparsify({"w": t, "b": torch.zeros(64)}, {}, nn.Module())
    assert "w" in index and "w" not in out and "b" in out  # 1-D tensors stay dense
    back = densify(out, index, {})["w"]
    assert torch.equal(back.view(torch.int32), t.view(torch.int32))


def test_encoding_is_chosen_per_tensor_and_only_when_smaller():
    dense = torch.randn(32, 32)
    mid = _sparse((256, 256), 0.4)
    very = _sparse((256, 256), 0.02)
    long_gaps = torch.zeros(100, 100)
    long_gaps[99, 99] = 1.0  # one value after 9,999 zeros: gap fillers are needed
    tensors = {"dense": dense, "mid": mid, "very": very, "long": long_gaps}
    out, index = sparsify(tensors, {}, nn.Module())
    assert "dense" not in index
    assert index["mid"]["encoding"] == "bitmap"
    assert index["very"]["encoding"] == "gaps"
    back = densify(out, index, {})
    for k, t in tensors.items():
        assert torch.equal(back[k], t)
    nbytes = sum(v.numel() * v.element_size() for k, v in out.items() if k.startswith("very"))
    assert nbytes < 0.1 * very.numel() * 4


def test_quantized_codes_with_group_zero_points_round_trip(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(_sparse((16, 64), 0.1) + 0.0)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    q = quantize_layer_rtn(lin, spec, None)
    model = nn.Sequential(q)
    compactnn.save(model, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a", model=nn.Sequential(nn.Linear(64, 16)))
    assert torch.equal(loaded[0].weight_codes, q.weight_codes)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))


def test_sparse_int4_artifact_is_over_20x_smaller_than_float(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    recipe = compactnn.Recipe.from_yaml(
        "name: sp90-w4\nsteps:\n"
        "  - {method: magnitude, config: {sparsity: 0.9}}\n"
        "  - method: rtn\n"
        "    config: {weight: {bits: 4, symmetric: false}, first_last_bits: null}\n"
    )
    small = compactnn.compress(model, recipe, progress=False)
    compactnn.save(model, tmp_path / "float")
    compactnn.save(small, tmp_path / "sparse")
    size = lambda p: os.path.getsize(tmp_path / p / "model.safetensors")  # noqa: E731
    assert size("float") / size("sparse") >= 20
    loaded = compactnn.load(tmp_path / "sparse", model=model)
    x = torch.randn(4, 256)
    assert torch.equal(loaded(x), small(x))


def _tiled(shape=(32, 64, 3, 3), tile=8, pruned=0.5, seed=0):
    """A conv weight whose (1 output x ``tile`` input channels x window) tiles are pruned."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    tiles = w.view(shape[0], shape[1] // tile, -1)
    drop = torch.randperm(tiles.shape[0] * tiles.shape[1], generator=g)
    drop = drop[: round(pruned * drop.numel())]
    tiles.view(-1, tiles.shape[-1])[drop] = 0.0
    return w


def test_tile_pruned_weight_is_stored_one_bit_per_tile():
    w = _tiled()
    out, index = sparsify({"w": w}, {}, nn.Module())
    entry = index["w"]
    assert entry["encoding"] == "blocks" and entry["block"] == 8 * 9
    # hand count: one bit per 72-entry tile, then every entry of the kept tiles (float32)
    assert out["w.sparse_index"].numel() == w.numel() // 72 // 8
    assert out["w.sparse_values"].numel() == w.numel() // 2
    assert torch.equal(densify(out, index, {})["w"], w)


def test_tile_pruned_codes_round_trip_and_shrink(tmp_path):
    conv = nn.Conv2d(64, 32, 3)
    with torch.no_grad():
        conv.weight.copy_(_tiled())
    q = quantize_layer_rtn(conv, QuantSpec(bits=4, symmetric=True), None)
    model = nn.Sequential(q)
    compactnn.save(model, tmp_path / "a")
    entry = read_header(tmp_path / "a")["sparse"]["0.weight.packed"]
    assert entry["encoding"] == "blocks" and entry["block"] % 9 == 0
    dense_bytes = 32 * 64 * 9 * 4 // 8
    sparse_bytes = entry["count"] * 4 // 8 + 32 * 64 * 9 // entry["block"] // 8
    assert sparse_bytes <= 0.51 * dense_bytes
    loaded = compactnn.load(tmp_path / "a", model=nn.Sequential(nn.Conv2d(64, 32, 3)))
    assert torch.equal(loaded[0].weight_codes, q.weight_codes)


def test_blocks_entry_with_a_bad_run_length_is_refused():
    out, index = sparsify({"w": _tiled()}, {}, nn.Module())
    index["w"]["block"] = 7  # does not divide the tensor
    with pytest.raises(ArtifactError, match="malformed"):
        densify(out, index, {})
