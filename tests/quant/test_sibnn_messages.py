"""SiBNN's user-facing messages: rho's range, recipes without {0, 1} activations, and the
deploy/export hints of {0, 1} blocks (no popcount kernel: it computes +-1 dots only)."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.config_checks import check_ranges, rule_for
from compactnn.deployment.refusals import check_backend
from compactnn.errors import CompactnnError
from compactnn.export.onnx import qdq_module
from compactnn.quant.sibnn import SIBNNConfig
from compactnn.recipe import resolve_recipe


@pytest.mark.parametrize("rho", [-1.0, 1.5])
def test_rho_is_refused_as_a_gradient_share_not_a_loss_weight(rho):
    with pytest.raises(CompactnnError) as err:
        SIBNNConfig(rho=rho)
    assert str(err.value) == f"sibnn: rho={rho} must lie in [0, 1]."
    assert rule_for("rho") is None  # no config uses rho as a loss weight
    check_ranges(SIBNNConfig, {"rho": -1}, "steps[0].config")  # left to SIBNNConfig


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_rho_in_range_is_kept(rho):
    assert SIBNNConfig(rho=rho).rho == rho


@pytest.mark.parametrize(
    "recipe, got, alternatives",
    [
        ("w1-sibnn", "not none (a weight-only recipe)", ("w1-elq", "w1-xnor", "w1a8-xnor")),
        ("w1a8-sibnn", "not a8", ("w1a8-elq", "w1a8-xnor")),
    ],
)
def test_recipes_without_zero_one_activations_name_working_alternatives(recipe, got, alternatives):
    with pytest.raises(CompactnnError) as err:
        resolve_recipe(recipe)
    message = str(err.value)
    assert message.startswith("sibnn quantizes activations to {0, 1}, so it takes a1, ")
    assert got in message and "use w1a1-sibnn" in message
    assert "binarises" not in message and "not no " not in message
    for name in alternatives:
        assert f"{name}" in message
        step = resolve_recipe(name).steps[0].config  # each alternative is a real recipe
        assert step.weight.bits == 1
        assert (step.act.bits if step.act else None) == (None if name.startswith("w1-") else 8)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3),
    )  # fmt: skip


@pytest.fixture(scope="module")
def frozen():
    """Frozen (post-training) models with {0, 1} (sibnn) and +-1 (xnor) binary blocks."""
    x = torch.randn(32, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    models = {r: compactnn.compress(_cnn(), r, calib_data=x, progress=False) for r in (
        "w1a1-sibnn", "w1a1-xnor")}  # fmt: skip
    return models, x


@pytest.mark.parametrize("backend", ["onnxruntime", "inductor"])
def test_zero_one_blocks_are_not_sent_to_popcount(frozen, backend):
    models, x = frozen
    with pytest.raises(CompactnnError) as err:
        check_backend(backend, models["w1a1-sibnn"], x)
    message = str(err.value)
    assert "backend='onednn'" in message and "(2, 4)" in message
    assert "int8 or popcount" not in message
    assert "int8 kernels" in message and "{0, 1}" in message


@pytest.mark.parametrize("backend", ["onnxruntime", "inductor"])
def test_plus_minus_one_blocks_keep_the_popcount_hint(frozen, backend):
    models, x = frozen
    with pytest.raises(CompactnnError, match=r"\(int8 or popcount kernels\)"):
        check_backend(backend, models["w1a1-xnor"], x)


def test_onnx_export_hint_does_not_offer_popcount_to_zero_one_blocks(frozen):
    models, _ = frozen
    with pytest.raises(CompactnnError) as err:
        qdq_module(models["w1a1-sibnn"])
    message = str(err.value)
    assert "backend='onednn'" in message and "int8 or popcount" not in message
    assert "int8; popcount for +-1 only" in message
