"""TernaryBERT: the row-wise ternary rule, the distillation loss and the label-free training."""

import dataclasses

import pytest
import torch

import compactnn
from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import QuantLinear
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import tiny_model
from compactnn.quant.ternarybert import TernaryBERTConfig, masked_mse, row_ternary
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


def _recipe(steps: int) -> Recipe:
    base = resolve_recipe("w2a8-ternarybert").steps[0]
    config = dataclasses.replace(base.config, steps=steps, lr=1e-3)
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
