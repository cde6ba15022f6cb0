"""FFN's label-free refit: output-error code refit, propagated targets, whole-model ranks,
distillation, and the deployed two-int8-conv form."""

import itertools
import math

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.quant.ffn import EXTRA_KEY, FFNConfig
from compactnn.quant.ffn_factor import (
    allocate_ranks,
    joint_scales,
    propagated_target,
    refit_codes,
    rtn_bytes,
    stored_bytes,
    ternary_factorize,
    truncation_errors,
)
from compactnn.recipe import Recipe, Step
from tests.quant._ptq_models import images, tiny_resnet


def _ffn(**kwargs) -> Recipe:
    return Recipe("ffn-test", (Step("ffn", FFNConfig(**kwargs)),))


def test_code_refit_lowers_the_output_error_monotonically():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 12, generator=g)
    x = torch.randn(200, 12, generator=g) * torch.linspace(0.2, 3.0, 12)  # uneven inputs
    h = x.T @ x
    u, v, _, _ = ternary_factorize(w, 5, iters=5)
    d = joint_scales(w, u, v, h)
    u2, v2, d2, history = refit_codes(w, u, v, d, h, sweeps=4)
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(history))
    assert history[-1] < 0.97 * history[0]  # the codes moved towards the outputs
    assert set(torch.cat([u2, v2]).unique().tolist()) <= {-1.0, 0.0, 1.0}
    direct = float((x @ (w - (u2 * d2) @ v2.T).T).pow(2).sum())  # the outputs, not H
    assert math.isclose(direct, history[-1], rel_tol=1e-4)
    start = float((x @ (w - (u * d) @ v.T).T).pow(2).sum())
    assert math.isclose(start, history[0], rel_tol=1e-4)


def test_propagated_target_is_the_least_squares_fit_to_the_float_outputs():
    g = torch.Generator().manual_seed(4)
    w, xf = torch.randn(4, 6, generator=g), torch.randn(300, 6, generator=g)
    xq = xf + 0.3 * torch.randn(300, 6, generator=g)  # inputs after compressed layers
    target = propagated_target(w, xq.T @ xq, xq.T @ xf, damp=0.0)
    ref = torch.linalg.lstsq(xq.double(), (xf @ w.T).double()).solution.T
    assert torch.allclose(target.double(), ref, atol=1e-4)
    same = propagated_target(w, xf.T @ xf, xf.T @ xf)  # nothing upstream changed: W itself
    assert torch.allclose(same, w, atol=1e-5)


def test_truncation_errors_fall_with_the_rank():
    w = torch.randn(10, 18, generator=torch.Generator().manual_seed(5))
    errors = truncation_errors(w, 6, iters=2, h=None)
    assert len(errors) == 6 and errors[-1] < 0.8 * errors[0] < 0.8
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(errors))  # nested least squares


def test_greedy_allocation_matches_brute_force_on_convex_errors():
    errors = {
        "a": [0.9, 0.5, 0.3, 0.2, 0.15],
        "b": [0.6, 0.45, 0.35, 0.3, 0.28],
        "c": [0.8, 0.3, 0.12, 0.05, 0.04],
    }
    costs = {n: [2 * r for r in range(1, 6)] for n in errors}  # 2 bytes per rank

    def total(ranks) -> float:
        return sum(errors[n][r - 1] for n, r in zip(errors, ranks, strict=True))

    for budget in (14, 16, 18, 20, 23):
        fits = [c for c in itertools.product(range(1, 6), repeat=3) if 2 * sum(c) <= budget]
        ranks = allocate_ranks(errors, costs, budget)
        assert 2 * sum(ranks.values()) <= budget
        assert math.isclose(total(ranks.values()), min(map(total, fits)))
    assert allocate_ranks(errors, costs, 18) == {"a": 3, "b": 3, "c": 3}
    assert allocate_ranks(errors, costs, 6) == {"a": 1, "b": 1, "c": 1}  # nothing to add


def test_whole_model_ranks_fit_the_summed_budget():
    torch.set_num_threads(1)
    x = images(16)
    q = compactnn.compress(tiny_resnet(), "w2-ffn", calib_data=[x], progress=False)
    ranks = q._compactnn["extra"][EXTRA_KEY]
    assert set(ranks) == {"block.conv1", "block.conv2"}
    assert sum(stored_bytes(8, 72, r) for r in ranks.values()) <= 2 * rtn_bytes(8, 72, 2.0)


def test_distillation_brings_the_outputs_closer_and_loads_bit_exactly(tmp_path):
    torch.set_num_threads(1)
    model, x = tiny_resnet(), images(32)
    with torch.no_grad():
        ref = model(x)

    def error(**kwargs):
        q = compactnn.compress(model, _ffn(**kwargs), calib_data=[x], progress=False)
        with torch.no_grad():
            return float((q(x) - ref).pow(2).mean()), q

    post_training, _ = error()
    distilled, q = error(distill_steps=20, distill_lr=1e-2)
    assert distilled < 0.9 * post_training
    seq = q.block.conv1
    assert torch.equal(seq[0].weight_scale, seq[0].weight_scale.half().float())
    assert set(seq[0].weight_codes.unique().tolist()) <= {-1, 0, 1}
    compactnn.save(q, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a", model=tiny_resnet())
    assert torch.equal(q(x), loaded(x))
    assert all(p.requires_grad for p in model.parameters())  # the input model is untouched


def test_w2a8_ffn_deploys_as_two_int8_convs_per_layer():
    from compactnn.deployment.onednn import Int8Conv2d

    torch.set_num_threads(1)
    x = images(32)
    q = compactnn.compress(tiny_resnet(), "w2a8-ffn", calib_data=[x], progress=False)
    deployed = compactnn.deploy(q, "onednn", example=x[:8])
    assert not deployed.kept_float and deployed.verification.passed
    int8 = [m for m in deployed.program.modules() if isinstance(m, Int8Conv2d)]
    assert len(int8) == 1 + 2 * 2  # the 8-bit stem, then V and U of both block convs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"allocation": "net"}, "allocation"),
        ({"distill_lr": 0.0}, "distill_lr"),
        ({"sweeps": -1}, "sweeps"),
        ({"distill_steps": True}, "distill_steps"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(CompactnnError, match=match):
        FFNConfig(**kwargs)
