"""search leaves its input model as it was and scores it as compress runs it; exact
allocations at tiny sensitivity scales; budgets and impossible formats refused by name."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.mixed_precision import Budget, search
from compactnn.mixed_precision.allocate import allocate


def bn_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )
    return model, [torch.randn(16, 1, 6, 6) + 1.0 for _ in range(2)]


def test_a_train_mode_model_is_neither_changed_nor_scored_in_train_mode():
    model, calib = bn_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def eval_fn(m):
        seen.append(m.training)
        return 1.0

    search(
        model,
        formats="w4a8,w8a8",
        budget=Budget(avg_bits=8),
        calib_data=calib,
        eval_fn=eval_fn,
        max_drop=0.5,
        max_evals=2,
        progress=False,
    )
    # before: BatchNorm running statistics updated, the baseline scored in train mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    assert seen and not any(seen)


def test_allocation_is_exact_at_tiny_sensitivity_scales():
    rng = np.random.default_rng(0)
    n = 10
    scores = np.stack([rng.uniform(1, 3, n), rng.uniform(0, 1, n)], 1) * 1e-10
    cost = np.stack([np.full(n, 2.0), np.full(n, 4.0)], 1) * rng.integers(1, 5, n)[:, None]
    # before: all at format 0 (the gap tolerance took the first feasible point) in both
    assert allocate(scores, {"b": cost}, {"b": cost[:, 1].sum()}).tolist() == [1] * n
    budget = cost[:, 0].sum() + 0.6 * (cost[:, 1] - cost[:, 0]).sum()
    rows = np.arange(n)
    best = min(
        (scores[rows, list(ch)].sum(), ch)
        for ch in itertools.product([0, 1], repeat=n)
        if cost[rows, list(ch)].sum() <= budget
    )
    got = allocate(scores, {"b": cost}, {"b": budget})
    assert math.isclose(scores[rows, got].sum(), best[0], rel_tol=1e-9)
    assert tuple(got.tolist()) == best[1]


def small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).eval()
    return model, [torch.randn(8, 1, 4, 4) for _ in range(2)]


def test_a_layer_no_format_fits_is_named_with_why():
    model, calib = small_cnn()
    with pytest.raises(CompactnnError) as e:  # the conv has 9 weights per row
        search(
            model,
            formats="w4-g32,w4-g64",
            budget=Budget(avg_bits=4),
            calib_data=calib,
            progress=False,
        )
    # before: "budget avg_bits: 4.00 bits/weight is below the smallest reachable inf"
    assert str(e.value).startswith(
        "no format in ['w4-g32', 'w4-g64'] is allowed for layer 0 (w4-g32: group size 32 "
        "does not divide its 9 weights per row; w4-g64: group size 64"
    )
    assert "inf" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(
        CompactnnError,
        match=r"layers 0 \(w2a8: 2 bits < first_last_min_bits=16;"
        r".*, 3 \(.*lower first_last_min_bits",
    ):
        search(
            model,
            formats="w2a8,w4a8",
            budget=Budget(avg_bits=4),
            calib_data=calib,
            first_last_min_bits=16,
            progress=False,
        )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True])
@pytest.mark.parametrize("field", ["avg_bits", "max_bytes"])
def test_budget_refuses_non_finite_and_bool(field, value):
    with pytest.raises(
        CompactnnError, match=rf"Budget.{field}={value!r} must be a positive finite"
    ):
        Budget(**{field: value})


def test_max_evals_zero_names_max_evals_and_embeddings_without_tables_warn():
    model, calib = small_cnn()
    with pytest.raises(CompactnnError) as e:
        search(
            model,
            formats="w2a8,w4a8",
            calib_data=calib,
            eval_fn=lambda m: 1.0,
            max_drop=0.5,
            max_evals=0,
            progress=False,
        )
    # before: "max_drop=0.5 must be >= 0 and max_evals=0 >= 1."
    assert str(e.value).startswith("max_evals=0 must be an integer >= 1")
    with pytest.warns(UserWarning, match=r"embeddings='w3-g32' ignored: the model has no emb"):
        r = search(
            model,
            formats="w2a8,w4a8",
            budget=Budget(avg_bits=4),
            calib_data=calib,
            embeddings="w3-g32",
            progress=False,
        )
    assert all("Embedding" not in s.targets.classes for s in r.recipe.steps)
