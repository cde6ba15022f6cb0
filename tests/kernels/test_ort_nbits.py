"""Weight-only models on ONNX Runtime MatMulNBits against the simulated model."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

import compactnn
from compactnn.core.qembedding import quantize_embedding_rtn
from compactnn.core.qlayers import quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.kernels.nbits_tables import gather_format, gather_tables, gather_tensors
from compactnn.kernels.ort_nbits import (
    ALIGN_FROM,
    DATA_ALIGN,
    SMALL_ALIGN,
    OrtNBitsModel,
    nbits_onnx,
    nbits_tensors,
    save_nbits,
    to_ort_nbits,
)
from tests.kernels._keywords import Keywords

pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", message=".*calibration samples")
pytestmark = pytest.mark.filterwarnings("ignore:to_ort_nbits. accuracy_level=4")


def test_nbits_tensors_pack_our_codes_low_nibble_first():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    q = quantize_layer_rtn(torch.nn.Linear(32, 3), spec, None)
    t = nbits_tensors(q, 4, 16)
    assert t["B"].shape == (3, 2, 8) and t["scales"].shape == (6,)
    codes = q.weight_codes.to(torch.int32)  # (3, 32), 0..15
    lo, hi = (t["B"] & 15).int(), (t["B"] >> 4).int()  # (3, 2, 8)
    assert torch.equal(torch.stack([lo, hi], -1).reshape(3, 32), codes)
    zero = q.weight_zero.to(torch.int32).reshape(-1)  # (6,) -> 3 bytes
    assert torch.equal((t["zero_points"] & 15).int(), zero[0::2])
    assert torch.equal((t["zero_points"] >> 4).int(), zero[1::2])


@pytest.mark.parametrize("recipe", ["w4-g32", "w3-g32"])
def test_exported_model_runs_our_codes(recipe):
    torch.manual_seed(0)
    model = Keywords().eval()
    ids = torch.randint(0, 50, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(model, recipe, calib_data=[batch], progress=False)
    with torch.no_grad():
        ref = q(**batch)[0]
        # float32 compute, float32 tables: the simulation up to summation order
        data, left = nbits_onnx(q, batch, accuracy_level=0, bf16_tables=False)
        exact = OrtNBitsModel(data, list(batch), threads=1)(**batch)[0]
        # first/last layers keep 8-bit groups: MatMulNBits bits=8 takes them too
        assert left == []
        torch.testing.assert_close(exact, ref, rtol=1e-4, atol=1e-4)
        # int8 activations per block (VNNI): a relative error of a few tenths of a percent
        data4, _ = nbits_onnx(q, batch, accuracy_level=4, bf16_tables=False)
        fast = OrtNBitsModel(data4, list(batch), threads=1)(**batch)[0]
    assert float((fast - ref).norm() / ref.norm()) < 0.03
    assert b"MatMulNBits" in data
    other = model.fc1.weight.detach().T.contiguous().numpy().tobytes()
    assert other[:256] not in data  # the float weights are gone, only our codes remain


class _Table(torch.nn.Module):
    """Only a lookup: the output is the table's rows (96 wide: 3 groups of 32, an odd count)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(40, 96)
        self.fc = torch.nn.Linear(96, 32)  # gives the recipe a linear layer to quantize

    def forward(self, input_ids, attention_mask):
        return (self.emb(input_ids) * attention_mask.unsqueeze(-1),)


@pytest.mark.parametrize(("recipe", "bits", "block"), [("w4-g32", 4, 32), ("w8", 8, 32)])
def test_quantized_table_is_gathered_from_codes_bit_exact(recipe, bits, block):
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(_Table().eval(), recipe, calib_data=[batch], progress=False)
    tables = gather_tables(q)
    ((name, table, got_bits, got_block),) = tables.values()
    assert (name, got_bits, got_block) == ("emb", bits, block)  # int8 per row: 3 blocks of 32
    t = gather_tensors(table, bits, block)
    # hand dequantization of the stored bytes: (q - z) * s per block of 32 along the row
    shift = -table.weight_spec.qtype.qmin
    if bits == 4:
        codes = torch.stack([t["data"] & 15, t["data"] >> 4], -1).reshape(40, 96)
        zero = torch.stack([t["zero_points"] & 15, t["zero_points"] >> 4], -1).reshape(40, -1)
    else:
        codes, zero = t["data"], t["zero_points"]
    assert torch.equal(codes.int() - shift, table.weight_codes.int())
    zero = zero[:, :3].float()  # 4-bit: 3 zero points padded to 2 bytes
    rows = (codes.float().reshape(40, 3, 32) - zero[..., None]) * t["scales"][..., None]
    assert torch.equal(rows.reshape(40, 96), table.weight)
    with torch.no_grad():
        data, _ = nbits_onnx(q, batch, accuracy_level=0)
        got = OrtNBitsModel(data, list(batch), threads=1)(**batch)[0]
        assert torch.equal(got, q(**batch)[0])  # the simulated lookup, bit for bit
    assert b"GatherBlockQuantized" in data
    assert table.weight.detach().numpy().tobytes()[:384] not in data  # no float table


def test_to_ort_nbits_runs_from_a_mapped_file_and_cleans_up(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = Keywords().eval()
    ids = torch.randint(0, 50, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(model, "w4-g32", calib_data=[batch], progress=False)
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        # int8 activations drift here: to_ort_nbits falls back to float32 compute (level 0)
        ref = OrtNBitsModel(nbits_onnx(q, batch, 0)[0], list(batch), threads=1)(**batch)[0]
        fast = to_ort_nbits(q, batch, threads=1, path=path)
        assert torch.equal(fast(**batch)[0], ref)  # same graph, weights from the file
        assert fast.nbytes == path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
        proto = onnx.load(str(path), load_external_data=False)
        offsets = [
            int({e.key: e.value for e in t.external_data}["offset"])
            for t in proto.graph.initializer
            if t.external_data
        ]
        assert offsets and all(o % SMALL_ALIGN == 0 for o in offsets)  # all small here
        assert {n.op_type for n in proto.graph.node} >= {"MatMulNBits", "GatherBlockQuantized"}
        own = to_ort_nbits(q, batch, threads=1)  # a private folder, gone with the model
        folder = own.path.parent
        assert torch.equal(own(**batch)[0], ref) and folder.exists()
    del own
    gc.collect()
    assert not folder.exists()
    with pytest.raises(compactnn.CompactnnError, match="not a file"):
        OrtNBitsModel(tmp_path / "missing.onnx", ["input_ids"])
    # a new folder is created; a folder given as the file is refused by name, nothing written
    nested = to_ort_nbits(q, batch, threads=1, path=tmp_path / "new" / "deep" / "m.onnx")
    assert torch.equal(nested(**batch)[0], ref)
    with pytest.raises(compactnn.CompactnnError, match="is a folder"):
        to_ort_nbits(q, batch, threads=1, path=tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["deep"]


def test_the_written_model_is_smaller_than_the_float_one(tmp_path):
    # 64 KiB of alignment per tensor made a tiny model's data file mostly zeros, larger than
    # its float weights; small tensors now start at a cache line
    torch.manual_seed(0)
    model = Keywords().eval()
    ids = torch.randint(0, 50, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(model, "w4-g32", calib_data=[batch], progress=False)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        # int8 activations drift here: to_ort_nbits falls back to float32 compute (level 0)
        ref = OrtNBitsModel(nbits_onnx(q, batch, 0)[0], list(batch), threads=1)(**batch)[0]
        fast = to_ort_nbits(q, batch, threads=1, path=tmp_path / "m.onnx")
        assert torch.equal(fast(**batch)[0], ref)
    written = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert fast.nbytes == written < float_bytes
    data = (tmp_path / "m.onnx.data").read_bytes()
    assert data.count(0) < len(data) / 2  # not mostly padding


def test_large_initializers_start_at_a_mapping_granularity(tmp_path):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    sizes = {"a": 1000, "big": ALIGN_FROM + 12, "b": 3000, "big2": ALIGN_FROM}
    inits = [
        numpy_helper.from_array(np.full(n, i + 1, np.uint8), name)
        for i, (name, n) in enumerate(sizes.items())
    ]
    graph = helper.make_graph([], "g", [], [], inits)
    total = save_nbits(helper.make_model(graph), tmp_path / "m.onnx", min_bytes=100)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    where = {
        t.name: {e.key: int(e.value) for e in t.external_data if e.key != "location"}
        for t in proto.graph.initializer
    }
    for name, n in sizes.items():
        assert where[name]["length"] == n
        align = DATA_ALIGN if n >= ALIGN_FROM else SMALL_ALIGN
        assert where[name]["offset"] % align == 0
    assert where["big"]["offset"] == DATA_ALIGN  # after 1000 bytes: one granule, not two
    assert where["b"]["offset"] == (where["big"]["offset"] + sizes["big"] + 63) // 64 * 64
    back = onnx.load(str(tmp_path / "m.onnx"))
    for t, want in zip(back.graph.initializer, inits, strict=True):
        assert numpy_helper.to_array(t).tobytes() == numpy_helper.to_array(want).tobytes()
    assert total == sum(f.stat().st_size for f in tmp_path.iterdir())


def test_a_model_without_weight_only_layers_is_refused_by_name():
    torch.manual_seed(0)
    model = Keywords().eval()
    ids = torch.randint(0, 50, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(compactnn.CompactnnError, match="no quantized linear layer"):
        to_ort_nbits(model, batch, threads=1)  # float: would have run as float, "MatMulNBits"
    w8a8 = compactnn.compress(model, "w8a8", calib_data=[batch], progress=False)
    with pytest.raises(compactnn.CompactnnError, match=r"fc1, fc2\) quantize .*to_kernels"):
        to_ort_nbits(w8a8, batch, threads=1)


def test_only_tables_on_an_integer_grid_become_gather_block_quantized():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    table = quantize_embedding_rtn(torch.nn.Embedding(8, 48), spec)
    assert gather_format(table) == (4, 16)
    table.weight_zero.add_(0.5)  # a fractional zero point has no uint4 form: stays float
    assert gather_format(table) is None
    narrow = quantize_embedding_rtn(torch.nn.Embedding(8, 24), QuantSpec(8, True, "channel"))
    assert gather_format(narrow) is None  # 24 = 8 x 3: no power-of-two block from 16


def test_a_tensor_example_is_refused_naming_keyword_inputs_and_deploy():
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    x = torch.randn(2, 1, 8, 8)
    q = compactnn.compress(cnn, "w8a8", calib_data=x, progress=False)
    with pytest.raises(
        compactnn.CompactnnError, match=r"example is a Tensor.*'input_ids'.*compactnn\.deploy"
    ):
        to_ort_nbits(q, x, threads=1)
