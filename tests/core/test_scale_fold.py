"""Scale folding (AWQ, SmoothQuant): scales that leave the float model unchanged, found only
where folding is exact; AWQ's scale search."""

import copy

import torch

from compactnn.core.scale_fold import find_scale_pairs, fold_is_exact, fold_scale, search_scale
from compactnn.core.spec import QuantSpec
from compactnn.models.tiny_hf import outputs, tiny_model


def _pairs(model, calib):
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def run():
        return outputs(model, calib[0])

    return run, find_scale_pairs(model, run, layers)


def test_awq_scales_leave_float_llama_unchanged():
    model, calib = tiny_model("llama")
    ref = outputs(model, calib[0])
    run, pairs = _pairs(model, calib)
    producers = {p for p, _ in pairs}
    assert "model.layers.0.input_layernorm" in producers  # norm -> q, k, v
    assert "model.layers.0.mlp.up_proj" in producers  # up -> down through the gate product
    g = torch.Generator().manual_seed(0)
    for producer, consumers in pairs:
        assert fold_is_exact(model, run, producer, consumers)
        c = model.get_submodule(consumers[0]).in_features
        mods = [model.get_submodule(n) for n in consumers]
        fold_scale(model.get_submodule(producer), mods, 0.5 + torch.rand(c, generator=g))
    torch.testing.assert_close(outputs(model, calib[0]), ref, rtol=1e-4, atol=1e-4)


def test_post_norm_bert_norms_are_rejected():
    # BERT's LayerNorm output also feeds the residual: scaling it would change the model
    model, calib = tiny_model("bert")
    before = copy.deepcopy(model.state_dict())
    run, pairs = _pairs(model, calib)
    exact = {p for p, cs in pairs if fold_is_exact(model, run, p, cs)}
    assert not any("LayerNorm" in p for p in exact)
    assert "encoder.layer.0.attention.self.value" in exact  # value -> attention output
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_search_scale_not_worse_than_no_scaling():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.logspace(-1, 1, 64)  # uneven channels
    w = torch.randn(32, 64, generator=g)
    spec = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16)
    from compactnn.core.qlayers import rtn_weight_qparams
    from compactnn.core.quantize import dequantize, grouped_view

    def err(s):
        c, sc, z = rtn_weight_qparams(w * s, spec)
        wq = dequantize(grouped_view(c, "group", 16), sc, z).reshape(w.shape) / s
        return float((x @ (wq - w).T).pow(2).mean())

    s = search_scale(x, [w], spec)
    assert err(s) < err(torch.ones(64))
