"""TernaryBERT: the row-wise ternary rule, the distillation loss and the label-free training."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import QuantLinear
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import tiny_model
from compactnn.quant.ternarybert import (
    RowTernaryWeight,
    TernaryBERTConfig,
    distill_loss,
    lr_factor,
    masked_mse,
    pooled,
    row_ternary,
)
from compactnn.recipe import Recipe, Step, resolve_recipe


def test_row_ternary_by_hand():
    w = torch.tensor([[1.0, -0.1, -2.0, 0.5], [0.2, 0.2, -0.2, 0.2]])
    codes, alpha = row_ternary(w, 0.7)
    # row 0: mean|w| = 0.9, delta 0.63 -> keep 1.0 and -2.0; alpha = 1.5
    # row 1: mean|w| = 0.2, delta 0.14 -> keep all; alpha = 0.2
    assert codes.tolist() == [[1, 0, -1, 0], [1, 1, -1, 1]]
    assert torch.allclose(alpha.squeeze(1), torch.tensor([1.5, 0.2]))


def test_masked_mse_ignores_padding():
    a, b = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert masked_mse(a, b, mask).item() == pytest.approx((1 + 1 + 9 + 9) / 4)
    assert masked_mse(a, b, None).item() == pytest.approx(F_mse(a, b))


def F_mse(a, b):
    return float(((a - b) ** 2).mean())


def _hidden_error(q, ref, calib):
    with torch.no_grad():
        return sum(
            float((q(**b).last_hidden_state - ref(**b).last_hidden_state).pow(2).mean())
            for b in calib
        )


def _recipe(steps: int, **changes) -> Recipe:
    base = resolve_recipe("w2a8-ternarybert").steps[0]
    # the paper's loss (hidden states and attention maps): the cosine term trades hidden-state
    # error for direction and has its own test below
    changes = dict(dict(steps=steps, lr=1e-3, cosine=0.0), **changes)
    config = dataclasses.replace(base.config, **changes)
    return Recipe(f"tb{steps}", (Step("ternarybert", config, targets=base.targets),))


def test_distillation_beats_no_training_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model, calib = tiny_model("bert")
    untrained = compactnn.compress(model, _recipe(0), calib_data=calib, progress=False)
    trained = compactnn.compress(model, _recipe(40), calib_data=calib, progress=False)
    assert model.config._attn_implementation == trained.config._attn_implementation
    layers = [m for m in trained.modules() if isinstance(m, QuantLinear)]
    assert layers and all(set(m.weight_codes.unique().tolist()) <= {-1, 0, 1} for m in layers)
    assert any(isinstance(m, QuantEmbedding) for m in trained.modules())
    assert _hidden_error(trained, model, calib) < 0.8 * _hidden_error(untrained, model, calib)
    compactnn.save(trained, tmp_path / "tb")
    loaded = compactnn.load(tmp_path / "tb")
    for b in calib[:2]:
        assert torch.equal(loaded(**b).last_hidden_state, trained(**b).last_hidden_state)


def test_bad_inputs_are_named():
    with pytest.raises(CompactnnError, match="ratio"):
        TernaryBERTConfig(ratio=0.0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(CompactnnError, match="Hugging Face"):
        compactnn.compress(cnn, "w2a8-ternarybert", calib_data=torch.randn(4, 1, 6, 6),
                           progress=False)  # fmt: skip


def test_learned_scale_gradient_is_the_written_formula():
    torch.manual_seed(0)
    w = torch.randn(3, 5)
    wq = RowTernaryWeight(0.7, w)
    codes, alpha = row_ternary(w, 0.7)
    assert torch.equal(wq.alpha.data, alpha)  # TWN's scale to start with
    latent = w.clone().requires_grad_(True)
    g = torch.randn(3, 5)
    (wq(latent) * g).sum().backward()
    # dL/dalpha_r = sum_j g[r, j] * codes[r, j]; dL/dw = g (straight through)
    assert torch.allclose(wq.alpha.grad, (g * codes).sum(1, keepdim=True))
    assert torch.equal(latent.grad, g)
    with torch.no_grad():
        wq.alpha.mul_(2.0)
    assert torch.allclose(wq(w), 2 * alpha * codes)
    assert torch.allclose(wq.export(w).scale.float(), (2 * alpha).half().float())


def test_cosine_term_by_hand():
    hs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # (1, 3, 2), last token padded
    ht = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pooled(hs, mask).tolist() == [[0.5, 0.5]]
    out = lambda h: SimpleNamespace(hidden_states=(h,), attentions=())  # noqa: E731
    cfg = TernaryBERTConfig(hidden=0.0, attention=0.0, cosine=2.0)
    # cos([0.5, 0.5], [1, 0]) = 1 / sqrt(2)
    expected = 2.0 * (1 - 2**-0.5)
    assert distill_loss(out(hs), out(ht), mask, cfg).item() == pytest.approx(expected, rel=1e-6)


def test_embedding_bits_set_the_token_table_grid():
    torch.manual_seed(0)
    model, calib = tiny_model("bert")
    base = resolve_recipe("w2a8-ternarybert").steps[0]
    config = dataclasses.replace(base.config, steps=0, embedding_bits=4, embedding_group=16)
    q = compactnn.compress(
        model, Recipe("tb", (Step("ternarybert", config, targets=base.targets),)),
        calib_data=calib, progress=False,
    )  # fmt: skip
    tables = {n: m for n, m in q.named_modules() if isinstance(m, QuantEmbedding)}
    token = max(tables.values(), key=lambda m: m.weight.shape[0])
    assert token.weight_spec.bits == 4 and token.weight_spec.group_size == 16
    assert all(m.weight_spec.bits == 8 for m in tables.values() if m is not token)
    with pytest.raises(CompactnnError, match="embedding_bits"):
        TernaryBERTConfig(embedding_bits=1)


def test_unlabeled_texts_never_hold_a_held_out_sentence():
    from compactnn.bench.ternarybert import unlabeled_texts
    from compactnn.data.text import sentences

    texts, held_out = unlabeled_texts(), sentences("eval")
    joined = "\n".join(held_out)
    assert not any(e in t for t in texts for e in held_out)
    assert not any(t in joined for t in texts)  # not even a span of one
    assert set(sentences("calib")) <= set(texts) and len(texts) > 2 * len(sentences("calib"))
    assert unlabeled_texts() == texts  # fixed by the seed


def test_lr_factor_warmup_then_cosine_by_hand():
    # 10 steps, warmup 0.2 -> w = 2: 1/3, 2/3, then (1 + cos(pi * (t - 2) / 8)) / 2
    f = [lr_factor(t, 10, 0.2) for t in range(10)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f[6] == pytest.approx(0.5) and f[4] == pytest.approx((1 + 2**-0.5) / 2)
    # no warmup: torch's own cosine annealing to 0
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    for t in range(10):
        assert lr_factor(t, 10, 0.0) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        sched.step()
    with pytest.raises(CompactnnError, match="warmup"):
        TernaryBERTConfig(warmup=1.0)


def test_distillation_without_attention_maps_keeps_sdpa():
    torch.manual_seed(0)
    model, calib = tiny_model("bert")
    model.set_attn_implementation("sdpa")
    untrained = compactnn.compress(model, _recipe(0), calib_data=calib, progress=False)
    recipe = _recipe(40, attention=0.0, warmup=0.1)
    trained = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    assert trained.config._attn_implementation == "sdpa"
    assert _hidden_error(trained, model, calib) < 0.8 * _hidden_error(untrained, model, calib)


def test_validation_split_is_disjoint():
    from compactnn.bench.ternarybert import validation_split

    texts = ["a b c", "d e f g", "x y z w v", "d e f", "q r s", "t u v w"] * 1 + ["y z w"]
    train, val = validation_split(texts, fraction=0.3)
    assert val == ["t u v w", "y z w"]
    # "x y z w v" holds the validation text "y z w"; nothing of val is trained on
    assert train == ["a b c", "d e f g", "d e f", "q r s"]


def test_device_option_trains_there_and_hands_back_on_the_models_device():
    torch.manual_seed(0)
    model, calib = tiny_model("bert")
    here = compactnn.compress(model, _recipe(5), calib_data=calib, progress=False)
    there = compactnn.compress(model, _recipe(5, device="cpu"), calib_data=calib, progress=False)
    for b in calib[:2]:
        assert torch.equal(there(**b).last_hidden_state, here(**b).last_hidden_state)
    assert {p.device.type for p in there.parameters()} == {"cpu"}
    with pytest.raises(CompactnnError, match="not a device name"):
        TernaryBERTConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CompactnnError, match="sees no CUDA GPU"):
            TernaryBERTConfig(device="cuda")


def test_training_a_cnn_is_refused_as_compress_refuses_it():
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    data = (torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,)))
    with pytest.raises(CompactnnError, match=r"'0' is a convolution.*for CNNs use w2a8-twn"):
        compactnn.train(cnn, "w2a2-ternarybert", data, epochs=1, progress=False)


def test_several_convolutions_are_named_in_plural():
    """T2 finding 10b: "'features.0.0' and 4 more is a convolution" read badly."""
    from compactnn.quant.ternarybert import check_transformer_layers

    convs = {f"c{i}": nn.Conv2d(1, 1, 1) for i in range(5)}
    with pytest.raises(CompactnnError) as err:
        check_transformer_layers(convs, None)
    assert "'c0' and 4 more layers are convolutions: pass a transformers model" in str(err.value)
    with pytest.raises(CompactnnError, match="'c0' and 1 more layer are convolutions"):
        check_transformer_layers(dict(list(convs.items())[:2]), None)
