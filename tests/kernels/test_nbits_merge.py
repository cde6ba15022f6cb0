"""Sibling MatMulNBits nodes merged into one: the same numbers as the separate nodes and as
a numpy product on the dequantized weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import compactnn
from compactnn.kernels.nbits_merge import merge_siblings, sibling_groups
from compactnn.kernels.ort_nbits import OrtNBitsModel, nbits_proto

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", message=".*calibration samples")

K, BLOCK = 64, 32
helper, from_array = onnx.helper, onnx.numpy_helper.from_array


def _weights(rng, n):
    """4-bit codes (low nibble first), per-block scales and packed zero points of an N x K
    weight, and its dequantized float matrix."""
    blob = rng.integers(0, 256, (n, K // BLOCK, BLOCK // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, n * K // BLOCK).astype(np.float32)
    zeros = rng.integers(0, 16, (n, K // BLOCK), dtype=np.uint8)
    packed = (zeros[:, 0] | (zeros[:, 1] << 4)).astype(np.uint8)
    codes = np.stack([blob & 15, blob >> 4], -1).reshape(n, K).astype(np.float32)
    dense = (codes - np.repeat(zeros, BLOCK, 1)) * np.repeat(scales.reshape(n, -1), BLOCK, 1)
    return [blob, scales, packed], dense


def _graph(level):
    """x feeds three projections with bias Adds (a, b, c), y feeds two (d with an Add that
    another node also reads, e without one), z feeds one (f): outputs are their results."""
    rng = np.random.default_rng(0)
    nodes, inits, dense, outputs = [], [], {}, []
    for name, src, n, bias in [
        ("a", "x", 32, True), ("b", "x", 48, True), ("c", "x", 16, True),
        ("d", "y", 32, True), ("e", "y", 16, False), ("f", "z", 32, False),
    ]:  # fmt: skip
        tensors, dense[name] = _weights(rng, n)
        names = [f"{name}_{s}" for s in ("B", "scales", "zp")]
        inits += [from_array(t, nm) for t, nm in zip(tensors, names, strict=True)]
        attrs = {"K": K, "N": n, "bits": 4, "block_size": BLOCK, "accuracy_level": level}
        mm = helper.make_node("MatMulNBits", [src, *names], [f"{name}_mm"], name=name, **attrs)
        mm.domain = "com.microsoft"
        nodes.append(mm)
        out = f"{name}_mm"
        if bias:
            b = rng.normal(size=n).astype(np.float32)
            dense[name + "_bias"] = b
            inits.append(from_array(b, f"{name}_b"))
            nodes.append(helper.make_node("Add", [f"{name}_b", out], [f"{name}_out"]))
            out = f"{name}_out"
        outputs.append(out)
    nodes.append(helper.make_node("Relu", ["d_mm"], ["d_relu"]))  # d's product has 2 readers
    outputs.append("d_relu")
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "siblings",
        [info(v, onnx.TensorProto.FLOAT, [2, 5, K]) for v in "xyz"],
        [info(o, onnx.TensorProto.FLOAT, None) for o in outputs], inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return model, dense, outputs


def _run(model, feed):
    # ONNX Runtime's own optimizations on, as users run it (they fuse a bias Add into the
    # MatMulNBits before it, where the merged node has it)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feed)


@pytest.mark.parametrize("level", [0, 4])
def test_merged_siblings_give_the_separate_nodes_numbers(level):
    model, dense, outputs = _graph(level)
    rng = np.random.default_rng(1)
    feed = {v: rng.normal(size=(2, 5, K)).astype(np.float32) for v in "xyz"}
    before = _run(model, feed)
    assert [len(g) for g in sibling_groups(onnx, model.graph)] == [3, 2]
    assert merge_siblings(onnx, model.graph) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("Split") == 2
    assert ops.count("Add") == 1  # x's biases went into the merged node; d's Add stays
    after = _run(model, feed)
    for name, b, a in zip(outputs, before, after, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    # against numpy on the dequantized weights (float compute: up to summation order)
    if level == 0:
        for name, got in zip("abc", after, strict=False):
            ref = feed["x"] @ dense[name].T + dense[name + "_bias"]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    names = {i.name for i in model.graph.initializer}
    assert not names & {"a_B", "a_b", "b_scales", "c_zp"}  # the separate copies are gone


class _Siblings(torch.nn.Module):
    """Query/key/value-like linears reading one hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 64)
        self.q, self.k, self.v = (torch.nn.Linear(64, 64) for _ in range(3))
        self.out = torch.nn.Linear(64, 64)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return (self.out(torch.tanh(self.q(h)) * self.k(h) + self.v(h)),)


def test_a_compressed_model_merges_its_siblings_exactly():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(_Siblings().eval(), "w4-g32", calib_data=[batch], progress=False)
    runs = {}
    for merge in (False, True):
        proto, _ = nbits_proto(q, batch, merge=merge, bf16_tables=False)
        ops = [n.op_type for n in proto.graph.node]
        runs[merge] = OrtNBitsModel(proto.SerializeToString(), list(batch), threads=1)(**batch)[0]
        runs[f"{merge}-ops"] = (ops.count("MatMulNBits"), ops.count("Split"))
    # q, k, v share the embedding (the recipe may keep 8 bits on its first layer: then k, v)
    assert runs["True-ops"][0] < runs["False-ops"][0] and runs["True-ops"][1] == 1
    assert torch.equal(runs[True], runs[False])
    with torch.no_grad():
        ref = q(**batch)[0]
    assert float((runs[True] - ref).norm() / ref.norm()) < 0.03
