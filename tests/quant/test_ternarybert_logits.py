"""TernaryBERT distils a task head's logits (the paper's prediction term) and reads the pooler
of a BERT classifier, which returns logits and no ``pooler_output``."""

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import tiny_model
from compactnn.quant.ternarybert import TernaryBERTConfig, _call, distill_loss, logits_loss
from compactnn.recipe import Recipe, Step, resolve_recipe


def _out(logits):
    return SimpleNamespace(hidden_states=(torch.zeros(1, 2, 2),), attentions=(), logits=logits)


def test_logits_term_by_hand():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # p^T = (3/4, 1/4)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    cfg = TernaryBERTConfig(hidden=1.0, attention=0.0, cosine=0.0, logits=2.0)
    assert distill_loss(_out(s), _out(t), None, cfg).item() == pytest.approx(2 * kl, rel=1e-5)
    assert distill_loss(_out(t), _out(t), None, cfg).item() == pytest.approx(0.0, abs=1e-6)
    off = dataclasses.replace(cfg, logits=0.0)
    assert distill_loss(_out(s), _out(t), None, off).item() == 0.0
    assert distill_loss(_out(None), _out(None), None, cfg).item() == 0.0  # no task head
    # a regression head (one output): MSE, as softmax over one logit is constant
    assert logits_loss(torch.tensor([[1.0]]), torch.tensor([[3.0]]), None).item() == 4.0
    # token logits (B, T, C): the mean over the tokens the mask keeps
    st, tt = torch.stack([s, s], 1), torch.stack([t, s], 1)  # token 0 differs, token 1 equal
    assert logits_loss(st, tt, torch.tensor([[1, 0]])).item() == pytest.approx(kl, rel=1e-5)
    assert logits_loss(st, tt, torch.tensor([[1, 1]])).item() == pytest.approx(kl / 2, rel=1e-5)


def test_all_terms_zero_is_refused():
    with pytest.raises(CompactnnError, match="logits are all 0"):
        TernaryBERTConfig(hidden=0.0, attention=0.0, cosine=0.0, logits=0.0)


def _classifier():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base, calib = tiny_model("bert")
    config = copy.deepcopy(base.config)
    config.num_labels = 3
    model = transformers.BertForSequenceClassification(config).eval()
    model.bert.load_state_dict(base.state_dict())
    with torch.no_grad():
        model.classifier.weight.mul_(50)  # logits of a trained head's size (|z| ~ 0.7)
    return model, calib


def test_call_reads_the_pooler_of_a_classifier():
    model, calib = _classifier()
    with torch.no_grad():
        out = _call(model, calib[1], attentions=False)
        ref = model.bert(**calib[1])
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output)
    assert not model.bert.pooler._forward_hooks  # the hook is removed again


def test_distillation_trains_the_classifier_head():
    model, calib = _classifier()
    ref = copy.deepcopy(model)
    base = resolve_recipe("w2a8-ternarybert").steps[0]
    config = dataclasses.replace(base.config, steps=40, lr=1e-3, cosine=0.0)
    recipe = Recipe("tb40", (Step("ternarybert", config, targets=base.targets),))
    trained = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    with torch.no_grad():
        q = torch.cat([trained(**b).logits for b in calib])
        r = torch.cat([ref(**b).logits for b in calib])
    cos = float(torch.nn.functional.cosine_similarity(q, r).mean())
    agree = float((q.argmax(-1) == r.argmax(-1)).float().mean())
    # before (no logits term, pooler unseen): cosine 0.619, argmax agreement 0.625; pooler term
    # alone (logits: 0): 0.574 and 0.5625; with the logits term: 0.820 and 0.9375
    assert cos > 0.75
    assert agree >= 0.9
