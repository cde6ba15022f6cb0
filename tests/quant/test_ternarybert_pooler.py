"""TernaryBERT distils a BERT pooler's output too (its dense layer is ternarised)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import compactnn
from compactnn.models.tiny_hf import tiny_model
from compactnn.quant.ternarybert import TernaryBERTConfig, distill_loss
from compactnn.recipe import Recipe, Step, resolve_recipe


def test_pooler_term_by_hand():
    hs, ht = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)  # equal hidden states: no hidden loss
    ps, pt = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    out = lambda h, p: SimpleNamespace(hidden_states=(h,), attentions=(), pooler_output=p)  # noqa: E731
    cfg = TernaryBERTConfig(hidden=2.0, attention=0.0, cosine=0.0)
    # hidden * MSE(P^S, P^T) = 2 * (1 + 4) / 2
    assert distill_loss(out(hs, ps), out(ht, pt), None, cfg).item() == pytest.approx(5.0)
    # a model without a pooler (pooler_output None or absent): no term
    assert distill_loss(out(hs, None), out(ht, None), None, cfg).item() == 0.0
    plain = SimpleNamespace(hidden_states=(hs,), attentions=())
    assert distill_loss(plain, plain, None, cfg).item() == 0.0


def _pooler_cosine(q, ref, calib) -> float:
    with torch.no_grad():
        cos = [
            torch.nn.functional.cosine_similarity(q(**b).pooler_output, ref(**b).pooler_output)
            for b in calib
        ]
    return float(torch.cat(cos).mean())


def test_distillation_brings_the_pooler_output_close():
    torch.manual_seed(0)
    model, calib = tiny_model("bert")
    assert model.pooler is not None
    base = resolve_recipe("w2a8-ternarybert").steps[0]
    config = dataclasses.replace(base.config, steps=40, lr=1e-3, cosine=0.0)
    recipe = Recipe("tb40", (Step("ternarybert", config, targets=base.targets),))
    trained = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    # without the pooler term the ternarised pooler stays at 0.897 (untrained: 0.898); with it 0.983
    assert _pooler_cosine(trained, model, calib) > 0.95
