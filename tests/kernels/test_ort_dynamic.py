"""Per-tensor dynamic W8A8 (``w8a8d``) on ONNX Runtime's DynamicQuantizeMatMul: the simulation."""

from __future__ import annotations

import warnings

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


def _ops(path) -> list[str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return [n.op_type for n in proto.graph.node]


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=200, max_position_embeddings=32,
    )  # fmt: skip
    ids = torch.randint(0, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded sentence
    return transformers.BertModel(config).eval(), {"input_ids": ids, "attention_mask": mask}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_bert_runs_every_layer_on_dynamic_quantize_matmul():
    model, batch = _bert()
    q = compactnn.compress(model, "w8a8d", progress=False)  # nothing to calibrate
    fast = compactnn.to_ort_nbits(q, batch, threads=1, bf16_tables=False)
    ops = _ops(fast.path)
    linears = sum(isinstance(m, compactnn.core.qlayers.QuantLinear) for m in q.modules())
    assert linears == 13  # 12 in the graph (the pooler's output is not traced)
    # each layer's query, key and value read one input: one node (quantized once) and a Split
    assert ops.count("DynamicQuantizeMatMul") == 2 * 4
    assert "MatMulNBits" not in ops and "GatherBlockQuantized" in ops  # 8-bit token table
    assert fast.runtime == "onnxruntime DynamicQuantizeMatMul"
    with torch.no_grad():
        ref = q(**batch)[0]
        out = fast(**batch)[0]
    assert _rel(ref, out) < 1e-5  # same codes, float32 summation order only
    assert fast.accuracy_check["drifted"] is None
    from compactnn.report.delivery import ort_runtime_name

    assert ort_runtime_name(fast) == "ONNX Runtime DynamicQuantizeMatMul"


def test_a_different_batch_changes_the_range_in_both():
    """One range per tensor: a sentence's output depends on its batch, in the simulation and
    in ONNX Runtime alike."""
    model, batch = _bert()
    q = compactnn.compress(model, "w8a8d", progress=False)
    fast = compactnn.to_ort_nbits(q, batch, threads=1, bf16_tables=False)
    one = {k: v[:1] for k, v in batch.items()}
    with torch.no_grad():
        sim_one, sim_all = q(**one)[0][0], q(**batch)[0][0]
        ort_one = fast(**one)[0][0]
    assert not torch.equal(sim_one, sim_all)
    assert _rel(sim_one, ort_one) < 1e-5


def test_gpt2_conv1d_layers_and_mixed_nodes():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=120, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 120, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(model, "w8a8d", calib_data=[batch], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = compactnn.to_ort_nbits(q, batch, threads=1, bf16_tables=False)
    ops = _ops(fast.path)
    assert ops.count("DynamicQuantizeMatMul") == 5  # 4 Conv1D + the head
    # the tied token table reads the head's codes (stored once); the position table has its own
    assert ops.count("GatherBlockQuantized") == 1
    import onnx

    proto = onnx.load(str(fast.path), load_external_data=False)
    head = next(n for n in proto.graph.node if "lm_head" in n.name)
    readers = [n.op_type for n in proto.graph.node if head.input[1] in n.input]
    assert sorted(readers) == ["DynamicQuantizeMatMul", "Gather"]
    with torch.no_grad():
        assert _rel(q(**batch).logits, fast(**batch)[0]) < 1e-5


def test_four_bit_weights_have_no_dynamic_form():
    model, batch = _bert()
    q = compactnn.compress(model, "w4a8d-g32", progress=False)
    with pytest.raises(CompactnnError, match=r"MatMulNBits or DynamicQuantizeMatMul.*'w8a8d'"):
        compactnn.to_ort_nbits(q, batch, threads=1)


def test_to_kernels_and_deploy_name_the_runtime_that_runs_it():
    model, batch = _bert()
    q = compactnn.compress(model, "w8a8d", progress=False)
    with pytest.warns(UserWarning, match=r"a8d\) dynamic activations run on ONNX Runtime"):
        compactnn.to_kernels(q)
    with pytest.raises(CompactnnError, match=r"per-tensor \(a8d\) dynamic activations"):
        compactnn.deploy(q, example=batch)


def test_cnn_deploy_names_the_dynamic_layers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 4)
    )
    x = torch.randn(2, 3, 8, 8)
    q = compactnn.compress(net, "w8a8d", progress=False)
    with pytest.raises(CompactnnError, match=r"taken from each tensor at run time \(a8d\)"):
        compactnn.deploy(q, example=x, backend="onednn")


def test_biases_fold_into_the_nodes_bit_identically():
    """Each DynamicQuantizeMatMul adds its own bias (no Add after it): outputs equal to the
    bit to the graph with separate Adds (MiniLM: 6-7% faster at batch 64)."""
    import onnx
    import onnxruntime as ort

    from compactnn.kernels.ort_nbits import nbits_proto

    model, batch = _bert()
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        biases[0].fill_(0.5)  # the others stay zero: one initializer the exporter shares
    q = compactnn.compress(model, "w8a8d", progress=False)
    folded, _ = nbits_proto(q, batch, 4, bf16_tables=False, merge=False)
    dqmm = [n for n in folded.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(dqmm) == 2 * 6 and all(len(n.input) == 5 and n.input[4] for n in dqmm)
    unfolded = onnx.ModelProto()  # the same graph with each bias added by an Add
    unfolded.CopyFrom(folded)
    adds = []
    for n in unfolded.graph.node:
        if n.op_type == "DynamicQuantizeMatMul":
            out, bias = n.output[0], n.input[4]
            del n.input[3:]
            n.output[0] = out + "_nobias"
            adds.append(onnx.helper.make_node("Add", [out + "_nobias", bias], [out]))
    nodes = list(unfolded.graph.node)
    del unfolded.graph.node[:]
    for n in nodes:  # each Add right after its node: the graph stays sorted
        unfolded.graph.node.append(n)
        unfolded.graph.node.extend(a for a in adds if a.input[0] in n.output)
    names = {i.name for i in folded.graph.input}
    feed = {k: v.numpy() for k, v in batch.items() if k in names}
    runs = [
        ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, feed
        )[0]
        for p in (folded, unfolded)
    ]
    assert (runs[0] == runs[1]).all() and abs(runs[0]).max() > 0
