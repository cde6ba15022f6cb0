"""The shared ONNX export: Hugging Face models are traced with their eager attention, on a
copy (the user's model keeps its own), and the export computes what the model computes."""

from __future__ import annotations

import collections
import io
import warnings

import pytest
import torch

from compactnn.core import onnx_trace
from compactnn.core.onnx_trace import export_dynamic

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def _export(model, example) -> tuple[bytes, collections.Counter]:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_dynamic(model, example, buf)
    graph = onnx.load_from_string(buf.getvalue()).graph
    return buf.getvalue(), collections.Counter(n.op_type for n in graph.node)


def test_hf_models_export_their_eager_attention(monkeypatch):
    model = _bert()
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # a padded sentence: the mask path is traced too
    example = {"input_ids": torch.randint(0, 50, (2, 7), generator=g), "attention_mask": mask}
    data, ops = _export(model, example)
    assert model.config._attn_implementation == "sdpa"  # the copy was switched, not the model
    monkeypatch.setattr(onnx_trace, "eager_attention", lambda m: None)
    _, sdpa_ops = _export(model, example)
    # scaled_dot_product_attention's export guards fully masked rows (IsNaN) and scales
    # queries and keys apart: more nodes for ONNX Runtime to run one by one
    assert sdpa_ops["IsNaN"] == 1 and ops["IsNaN"] == 0
    assert sum(ops.values()) < sum(sdpa_ops.values())
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in example.items()}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        want = model(**example).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_models_without_attention_are_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    onnx_trace.eager_attention(model)  # nothing to switch, no error
    _, ops = _export(model, torch.randn(2, 4))
    assert ops["Gemm"] + ops["MatMul"] == 1


def test_a_float_attention_model_exports_for_timing_and_prints_nothing(tmp_path, capfd):
    """deploy(auto) races ONNX Runtime fp32 on export_dynamic's file: nn.MultiheadAttention's
    fused kernel has no ONNX form, and a failing exporter printed its whole graph."""
    import onnxruntime as ort

    from compactnn.core.onnx_trace import export_dynamic

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(2, 5, 16)
    names = export_dynamic(model, x, tmp_path / "m.onnx")
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {names[0]: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-5)
    out = capfd.readouterr()
    assert out.out == "" and "Traceback" not in out.err


def test_a_split_vit_exports_without_tracer_warnings(tmp_path):
    """torchvision's ViT checks its image size with ``torch._assert`` and the split attention
    checks its key/value shapes: constants for one trace, so exporting warns about neither."""
    pytest.importorskip("torchvision")
    import compactnn
    from compactnn.export.onnx import export_onnx
    from tests._vit import tiny_vit

    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qmodel = compactnn.compress(tiny_vit(), "w8a8", calib_data=x, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_onnx(qmodel, tmp_path / "m.onnx", example=x[:8])
    assert result.passed
    tracer = [f"{w.filename}:{w.lineno}" for w in caught if w.category is torch.jit.TracerWarning]
    assert tracer == []
