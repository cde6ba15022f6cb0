"""The fastest float path: contenders checked against fp32 eager, timed side by side."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from compactnn.measure import float_paths
from compactnn.measure.float_paths import fastest_float_path


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).eval()


X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_contenders_agree_with_eager_and_the_fastest_wins():
    pytest.importorskip("onnxruntime")
    model = _model()
    with torch.no_grad():
        ref = model(X)
    paths = fastest_float_path(model, X, quick=True, threads=1, extra={"cheap": nn.Identity()})
    assert set(paths.timings) == {"fp32-eager", "bf16-autocast", "ort-fp32", "cheap"}
    assert paths.skipped == {"torch.compile": "not tried in quick mode"}
    floats = {k: t.median_s for k, t in paths.timings.items() if k != "cheap"}
    assert paths.winner == min(floats, key=floats.get)  # an extra model never wins
    assert paths.best is paths.timings[paths.winner] and paths.best.batch == 4
    # the errors are measured against an independent float computation
    ort_out = float_paths.ort_float(model, X, threads=1)(X)
    assert paths.errors["ort-fp32"] == pytest.approx(
        float((ort_out - ref).abs().max() / ref.abs().max()), abs=1e-7
    )
    assert paths.errors["ort-fp32"] <= 1e-3 and 0 < paths.errors["bf16-autocast"] <= 5e-2
    assert paths.to_dict()["winner"] == paths.winner


def test_a_diverging_contender_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(float_paths.TOLERANCE, "bf16-autocast", 0.0)  # bf16 cannot be exact
    monkeypatch.setattr(float_paths, "ort_float", _raise_import_error)
    paths = fastest_float_path(_model(), X, quick=True, threads=1, runs=1)
    assert set(paths.timings) == {"fp32-eager"} and paths.winner == "fp32-eager"
    assert paths.skipped["bf16-autocast"].startswith("diverges from fp32 eager: max difference")
    assert paths.skipped["ort-fp32"].startswith("not installed")


def _raise_import_error(*_a, **_k):
    raise ImportError("onnxruntime is not installed")


def test_compilation_is_bounded_in_time():
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="did not compile within"):
        float_paths.compiled(_model(), X, timeout_s=0.01)
    torch._dynamo.reset()
    assert time.perf_counter() - start < 30


def test_bert_family_models_also_race_onnx_runtimes_fused_graph():
    """A BERT-family encoder gets a second ONNX Runtime contender: the export after ONNX
    Runtime's transformer optimizer (attention, LayerNorm and GELU fused). It computes the same
    model (checked here against eager, as the race checks it) with fewer nodes."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    example = {"input_ids": torch.randint(0, 60, (2, 9), generator=g), "attention_mask": mask}
    contenders, skipped, _ = float_paths.float_contenders(model, example, quick=True, threads=1)
    assert float_paths.ORT_FUSED in contenders, skipped
    with torch.no_grad():
        want = model(**example).last_hidden_state
        got = contenders[float_paths.ORT_FUSED](**example)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    import tempfile
    from pathlib import Path

    from compactnn.core.onnx_trace import export_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_dynamic(model, example, path)
        plain = onnx.load(str(path)).graph.node
        fused = onnx.load(str(float_paths.ort_fused_file(model, path))).graph.node
    assert len(fused) < len(plain) / 2
    assert any(n.op_type == "SkipLayerNormalization" for n in fused)
    # a CNN (no Hugging Face config) gets no such contender
    assert float_paths.ORT_FUSED not in float_paths.float_contenders(_model(), X, quick=True)[0]


def test_fastest_float_form_returns_the_winning_module_itself():
    model = _model()
    fast, paths = float_paths.fastest_float_form(model, X, quick=True, threads=1)
    assert paths.winner in paths.timings and "torch.compile" in paths.skipped
    if paths.winner == float_paths.EAGER:
        assert fast is model
    with torch.no_grad():
        ref = model(X)
        assert (fast(X).float() - ref).abs().max() <= 5e-2 * ref.abs().max()


def test_a_plain_float_model_has_no_compactnn_module_or_mask():
    from torch.nn.utils import parametrize

    from compactnn.prune.masks import MaskedWeight

    assert float_paths.is_plain_float(_model())
    assert not float_paths.is_plain_float(nn.Sequential(_model(), MaskedWeight(torch.ones(1))))
    masked = _model()
    parametrize.register_parametrization(masked[0], "weight", nn.Identity())
    assert not float_paths.is_plain_float(masked)


class _FeatFirst(nn.Module):
    """Returns ``{"feat": f, "logits": head(f)}``: the main output is the second."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x.flatten(1))
        return {"feat": f, "logits": self.head(f)}


def test_onnx_runtime_float_returns_the_main_output_of_a_dict_model():
    """The contender must give what eval scores (the dict's logits, not its first value);
    it returned ONNX output 0 (the 32-wide features) and was dropped as diverging."""
    pytest.importorskip("onnxruntime")
    model, x = (
        _FeatFirst().eval(),
        torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2)),
    )
    assert float_paths.main_output_index(model, x) == 1
    ort = float_paths.ort_float(model, x, threads=1)
    with torch.no_grad():
        got, ref = ort(x), model(x)["logits"]
    assert got.shape == (4, 10) and torch.allclose(got, ref, atol=1e-5)
