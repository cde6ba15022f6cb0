import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import compactnn
from compactnn.core.qlayers import QuantConv2d, QuantLinear
from compactnn.core.qlayers import is_quant_layer as is_quant
from compactnn.errors import CompactnnError
from compactnn.export.onnx import export_onnx, int32_bias_codes, int32_bias_layers
from tests._vit import tiny_vit
from tests.deployment.conftest import make_net


@pytest.fixture(scope="module")
def qnet():
    torch.manual_seed(1)
    calib = torch.randn(32, 3, 16, 16)
    return compactnn.compress(make_net(), "w8a8", calib_data=calib, progress=False), calib


def test_round_trip_within_one_step(qnet, tmp_path):
    qmodel, calib = qnet
    path = tmp_path / "model.onnx"
    result = export_onnx(qmodel, path, example=calib[:8])
    assert result.max_diff_steps <= 1.0 and path.exists()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)  # another batch size: the batch axis is dynamic
    out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        ref = qmodel(x)
    step = (ref.max() - ref.min()).item() / 255
    assert (ref - out).abs().max().item() <= step


def test_weights_are_the_integer_codes_unchanged(qnet, tmp_path):
    qmodel, calib = qnet
    path = tmp_path / "model.onnx"
    export_onnx(qmodel, path, example=calib[:4])
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    int8_weights = [
        inits[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim > 1
    ]
    layers = [m for m in qmodel.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(int8_weights) == len(layers)
    assert all(w.dtype == np.int8 for w in int8_weights)
    expected = sorted(m.weight_codes.numpy().tobytes() for m in layers)
    assert sorted(w.tobytes() for w in int8_weights) == expected
    # every Conv/Gemm reads a Q -> DQ activation (the simulation's input quantizer)
    producer = {o: n for n in graph.node for o in n.output}
    compute = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(compute) == len(layers)
    for n in compute:
        dq = producer[n.input[0]]
        assert dq.op_type == "DequantizeLinear"
        assert producer[dq.input[0]].op_type == "QuantizeLinear"
    # and no float copy of a weight is left
    assert not any(v.dtype == np.float32 and v.ndim > 1 for v in inits.values())


def test_failed_check_leaves_no_file(qnet, tmp_path):
    qmodel, calib = qnet
    path = tmp_path / "model.onnx"
    with pytest.raises(CompactnnError, match="FAILED"):
        export_onnx(qmodel, path, example=calib[:4], tolerance=-1.0)
    assert not path.exists()
    with pytest.raises(CompactnnError, match="example="):
        export_onnx(qmodel, path, example=None)


def test_output_path_checked_before_the_export(qnet, tmp_path, monkeypatch):
    qmodel, calib = qnet
    import compactnn.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "to_onnx_bytes", lambda *a: pytest.fail("exported"))
    with pytest.raises(CompactnnError, match=r"is a folder.*model\.onnx"):
        export_onnx(qmodel, tmp_path, example=calib[:4])
    (tmp_path / "old.onnx").write_bytes(b"mine")
    with pytest.raises(CompactnnError, match="exists; pass force=True"):
        export_onnx(qmodel, tmp_path / "old.onnx", example=calib[:4])
    assert (tmp_path / "old.onnx").read_bytes() == b"mine"
    monkeypatch.undo()
    export_onnx(qmodel, tmp_path / "new" / "m.onnx", example=calib[:4])  # parent created
    export_onnx(qmodel, tmp_path / "old.onnx", example=calib[:4], force=True)
    assert onnx.load(str(tmp_path / "old.onnx")).graph.node


def test_int32_bias_codes_and_scale_by_hand():
    codes, scale = int32_bias_codes(
        torch.tensor([0.1, -0.2, 3.0]), 0.5, torch.tensor([0.1, 0.3, 0.2])
    )
    assert codes.dtype == torch.int32 and codes.tolist() == [2, -1, 30]  # 0.1/0.05, -0.2/0.15
    assert torch.allclose(scale, torch.tensor([0.05, 0.15, 0.1]))
    assert int32_bias_codes(torch.tensor([1e9]), 1e-3, torch.tensor([1e-3])) is None  # > int32
    assert int32_bias_codes(torch.tensor([1.0]), 0.5, torch.tensor([0.0])) is None  # zero scale


def test_biases_are_int32_codes_on_the_accumulator_grid(qnet, tmp_path):
    """A layer whose output is quantized again (the layers ONNX Runtime fuses) stores its bias
    as int32 codes on the accumulator grid s_x * s_w (what QLinearConv / QGemm add): the
    simulation's float bias rounded onto that grid, and listed in the file's metadata; every
    other layer keeps the simulation's float bias."""
    qmodel, calib = qnet
    result = export_onnx(qmodel, tmp_path / "m.onnx", example=calib[:8])
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def value(name):  # an initializer or a Constant node's tensor
        return (
            inits[name] if name in inits else numpy_helper.to_array(producer[name].attribute[0].t)
        )

    biases = [m.bias.detach().double().numpy() for m in qmodel.modules() if is_quant(m)]
    compute = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(compute) == len(biases)
    stored = 0
    for node in compute:
        x_scale = value(producer[node.input[0]].input[1])
        scale = np.float32(x_scale) * inits[producer[node.input[1]].input[1]]
        dq = producer.get(node.input[2])
        if dq is not None:
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int32
            np.testing.assert_allclose(inits[dq.input[1]], scale, rtol=1e-6)
            codes, stored = inits[dq.input[0]], stored + 1
        else:  # a float output: the simulation's float bias itself
            assert any(np.array_equal(inits[node.input[2]], b.astype(np.float32)) for b in biases)
            continue
        same = [
            b for b in biases if b.shape == codes.shape and np.allclose(np.round(b / scale), codes)
        ]
        assert same, node.name
    assert stored >= 1
    assert len(int32_bias_layers((tmp_path / "m.onnx").read_bytes())) == stored
    # the file runs exactly in ONNX Runtime; the int32 rounding itself is measured apart
    assert result.max_diff_steps < 1e-3
    assert 0 <= result.bias_rounding_steps < 1


@pytest.mark.parametrize("recipe", ["w2a8-twn", "w4a8-inq", "w2a8-ttq"])
def test_codebook_and_ternary_layers_run_exactly_in_onnx_runtime(recipe, tmp_path):
    """ONNX Runtime's optimizer rounded float biases (TWN: 3.75 steps, refused) and re-quantized
    float codebook weights to per-tensor int8 (INQ 1.56 steps, TTQ 1.2) behind the export's
    back; the file now states both, and ONNX Runtime reproduces it."""
    torch.manual_seed(1)
    calib = torch.randn(32, 3, 16, 16)
    qmodel = compactnn.compress(make_net(), recipe, calib_data=calib, progress=False)
    result = export_onnx(qmodel, tmp_path / "m.onnx", example=calib[:8])
    assert result.max_diff_steps < 1e-3, result


def test_binary_blocks_are_refused_by_name(tmp_path):
    from compactnn.engines.binary import BinaryBlock, BinaryWeight

    torch.manual_seed(0)
    block = BinaryBlock(torch.nn.Conv2d(4, 4, 3, padding=1), "xnor", BinaryWeight())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), block).eval()
    with pytest.raises(CompactnnError, match=r"binary blocks \(1\).*backend='onednn'"):
        export_onnx(model, tmp_path / "m.onnx", example=torch.randn(2, 3, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


def _ort_steps(qmodel, data, x):
    """ONNX Runtime's output for ``data`` against the simulation, in output steps, by hand."""
    import onnxruntime as ort

    out = torch.from_numpy(ort.InferenceSession(data).run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        ref = qmodel(x)
    return float((ref - out).abs().max()) / (float(ref.max() - ref.min()) / 255)


def test_onnxruntime_deploy_is_measured_against_the_simulation(qnet):
    """The onnxruntime backend reported ORT against its own QDQ file (TWN: 1e-5 steps, while
    the int32 biases put it 3.75 steps from the simulation, where onednn refused at the
    same standard); now its max difference and tolerance are ORT against the simulation."""
    qmodel, calib = qnet
    fast = compactnn.deploy(qmodel, "onnxruntime", example=calib[:8])  # w8a8: still passes
    by_hand = _ort_steps(qmodel, fast.onnx_bytes, calib[:8])
    assert fast.verification.passed and fast.verification.max_diff_steps <= 1.0
    assert fast.verification.max_diff_steps == pytest.approx(by_hand, rel=1e-3, abs=1e-4)
    torch.manual_seed(1)
    twn = compactnn.compress(make_net(), "w2a8-twn", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError, match=r"int32 biases .* make most of this gap") as info:
        compactnn.deploy(twn, "onnxruntime", example=calib[:8])
    steps = float(str(info.value).split("max difference ")[1].split(" steps")[0])
    data = compactnn.deploy(twn, "onnxruntime", example=calib[:8], tolerance=100).onnx_bytes
    assert steps == pytest.approx(_ort_steps(twn, data, calib[:8]), rel=1e-2) and steps > 2


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.zeta, self.alpha = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(x).relu().mean((2, 3))
        return {"zeta": self.zeta(h), "alpha": 3 * self.alpha(h)}


def test_dict_outputs_with_the_same_shape_are_paired_in_graph_order(tmp_path):
    """ONNX Runtime returns outputs in graph order (the dict's), the check sorted the keys:
    (8, 10) != (8, 4) for logits/box, and 956 silent steps for two (8, 4) heads."""
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    qmodel = compactnn.compress(_TwoHeads().eval(), "w8a8", calib_data=x, progress=False)
    result = export_onnx(qmodel, tmp_path / "m.onnx", example=x[:8])
    assert result.passed and result.max_diff_steps < 1e-3
    fast = compactnn.deploy(qmodel, "onnxruntime", example=x[:8])
    assert fast.verification.passed and fast.verification.max_diff_steps < 1e-3
    got = fast(x[8:16])  # the same dict, keys in the model's order
    with torch.no_grad():
        ref = qmodel(x[8:16])
    assert (ref["zeta"] - ref["alpha"]).abs().max() > 0.1
    assert list(got) == list(ref)
    for key in ref:
        step = float(ref[key].max() - ref[key].min()) / 255
        assert float((ref[key] - got[key]).abs().max()) <= step


class _OwnForward(torch.nn.MultiheadAttention):
    """Its own forward (so compress leaves it unsplit) that takes the fused fast path."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class _Attention(torch.nn.Module):
    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)
        self.attn = attn
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        h = self.proj(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.fc(h.mean(1))


@pytest.mark.filterwarnings("ignore:.*weight bytes stay in float")
@pytest.mark.filterwarnings("ignore:kept in float")
@pytest.mark.parametrize("own_forward", [False, True], ids=["add_bias_kv", "own_forward"])
def test_multihead_attention_exports_without_the_fused_fast_path(own_forward, tmp_path, capfd):
    """With out_proj left float, nn.MultiheadAttention ran its fused fast path while being
    exported: a raw UnsupportedOperatorError (aten::_native_multi_head_attention) and the
    whole TorchScript graph on stdout. Both attentions stay unsplit (compress splits the
    others); only the one with its own forward would take the fast path (add_bias_kv=True
    turns it off by itself), so it is the one that needs the exporter to turn it off."""
    torch.manual_seed(0)
    attn = (
        _OwnForward(32, 2, batch_first=True)
        if own_forward
        else torch.nn.MultiheadAttention(32, 2, batch_first=True, add_bias_kv=True)
    )
    x = torch.randn(32, 6, 16, generator=torch.Generator().manual_seed(0))
    qmodel = compactnn.compress(
        _Attention(attn).eval(), "w8a8", calib_data=x, progress=False, ignore=["*out_proj"]
    )
    assert type(qmodel.attn) is type(attn)  # not split
    result = export_onnx(qmodel, tmp_path / "m.onnx", example=x[:8])
    assert result.passed and _ort_steps(qmodel, (tmp_path / "m.onnx").read_bytes(), x[8:]) < 1
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    assert compactnn.deploy(qmodel, "onnxruntime", example=x[:8]).verification.passed
    assert capfd.readouterr().out == ""


class _Bessel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        return torch.i0(self.fc(x))  # aten::i0 has no ONNX form


def test_exporter_failures_are_one_line_and_print_nothing(tmp_path, capfd):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    qmodel = compactnn.compress(_Bessel().eval(), "w8a8", calib_data=x, progress=False)
    with pytest.raises(CompactnnError, match=r"operator 'aten::i0'.*backend='onednn'") as info:
        export_onnx(qmodel, tmp_path / "m.onnx", example=x[:4])
    assert "\n" not in str(info.value) and not (tmp_path / "m.onnx").exists()
    assert "graph" not in capfd.readouterr().out  # the exporter's dump of the graph


def test_a_wrong_shape_example_names_both_shapes(qnet, tmp_path):
    """A raw RuntimeError from the exporter's trace, where deploy refused cleanly."""
    qmodel, _ = qnet
    with pytest.raises(CompactnnError, match=r"\(4, 3, 10\).*Pass float32 .*C=3") as info:
        export_onnx(qmodel, tmp_path / "m.onnx", example=torch.randn(4, 3, 10))
    assert "\n" not in str(info.value) and not (tmp_path / "m.onnx").exists()


def test_a_submodule_named_graph_exports(tmp_path):
    """torch.fx cannot trace it (deploy names the attribute), and the TorchScript exporter
    read the model's own ``.graph`` as its graph (AttributeError: no attribute 'outputs')."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.graph = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.graph(x).mean((2, 3)))

    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    qmodel = compactnn.compress(Net().eval(), "w8a8", calib_data=x, progress=False)
    export_onnx(qmodel, tmp_path / "m.onnx", example=x[:8])
    assert _ort_steps(qmodel, (tmp_path / "m.onnx").read_bytes(), x[8:]) < 1
    with pytest.raises(CompactnnError, match=r"attribute 'graph'.*Rename it"):
        compactnn.deploy(qmodel, "onednn", example=x[:8])


def test_export_leaves_the_callers_model_in_its_mode(tmp_path):
    torch.manual_seed(1)
    calib = torch.randn(32, 3, 16, 16)
    qmodel = compactnn.compress(make_net(), "w8a8", calib_data=calib, progress=False)
    qmodel.train()  # e.g. between training epochs
    export_onnx(qmodel, tmp_path / "m.onnx", example=calib[:8])
    assert qmodel.training and all(m.training for m in qmodel.modules())


def _dequantized(layer: QuantLinear) -> torch.Tensor:
    """``layer``'s per-group codes times their scales, by hand: ``(codes - zero) * scale``."""
    rows, groups = layer.weight_scale.shape
    codes = layer.weight_codes.float().reshape(rows, groups, -1)
    w = (codes - layer.weight_zero[..., None]) * layer.weight_scale[..., None]
    return w.reshape(layer.weight.shape)


def test_group_wise_weight_only_layers_export_dequantized_and_verify(tmp_path):
    """Every group-wise layer raised a raw RuntimeError (its (rows, groups) scales expanded
    to one per row) before anything was written."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ).eval()  # fmt: skip
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    qmodel = compactnn.compress(net, "w4-g32", calib_data=x, progress=False)
    middle = qmodel[2]
    assert middle.weight_spec.bits == 4 and middle.weight_scale.shape == (64, 2)
    result = export_onnx(qmodel, tmp_path / "m.onnx", example=x[:8])
    assert result.passed and result.max_diff_steps < 1e-3
    assert _ort_steps(qmodel, (tmp_path / "m.onnx").read_bytes(), x[8:]) < 1e-3
    stored = [
        torch.from_numpy(numpy_helper.to_array(t).copy())
        for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
        if tuple(t.dims) == (64, 64)
    ]
    by_hand = _dequantized(middle)  # per-group weights are stored dequantized (float)
    assert any(torch.allclose(w, by_hand, rtol=0, atol=1e-6) for w in stored)


@pytest.mark.parametrize("recipe", ["w8a8", "w4-g32"])
def test_a_split_vision_transformer_exports_and_verifies(recipe, tmp_path):
    """compress splits each nn.MultiheadAttention into called q/k/v/out_proj layers; the
    file runs them (quantized) in ONNX Runtime as the simulation does."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qmodel = compactnn.compress(tiny_vit(), recipe, calib_data=x, progress=False)
    attention = qmodel.encoder.layers[0].self_attention
    assert all(is_quant(getattr(attention, p)) for p in ("q_proj", "k_proj", "v_proj"))
    result = export_onnx(qmodel, tmp_path / "m.onnx", example=x[:8])
    assert result.passed and result.max_diff_steps < 1e-3
    assert _ort_steps(qmodel, (tmp_path / "m.onnx").read_bytes(), x[8:]) < 1
