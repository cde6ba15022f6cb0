"""Residual-group candidates: discovery, the joint integer program, sensitivity, recipe."""

import itertools

import numpy as np
import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.mixed_precision import Budget, build_recipe, search
from compactnn.mixed_precision.allocate import allocate_with_groups, assignment_total
from compactnn.mixed_precision.formats import parse_formats
from compactnn.mixed_precision.groups import measure_groups, residual_groups
from compactnn.recipe import Recipe
from tests.mixed_precision._blocks import Block


def block_model():
    torch.manual_seed(0)
    return Block().eval(), [torch.randn(16, 1, 6, 6) for _ in range(2)]


NAMES = ["stem", "a", "b", "head"]


def test_residual_group_found_from_dependency_graph():
    model, calib = block_model()
    assert residual_groups(model, NAMES, calib[0]) == [("stem", "b")]


def brute_force(scores, costs, budgets, groups):
    best, best_pick = np.inf, None
    layer_opts = itertools.product(range(scores.shape[1]), repeat=scores.shape[0])
    for c, picks in itertools.product(
        layer_opts, itertools.product(*[range(len(s)) for s, _ in groups])
    ):
        c = np.array(c)
        total = {
            k: assignment_total(costs[k], c)
            + sum(g[1].get(k, np.zeros(len(g[0])))[p] for g, p in zip(groups, picks, strict=True))
            for k in budgets
        }
        if any(total[k] > b + 1e-9 for k, b in budgets.items()):
            continue
        s = assignment_total(scores, c) + sum(g[0][p] for g, p in zip(groups, picks, strict=True))
        if s < best - 1e-12:
            best, best_pick = s, (c, list(picks))
    return best, best_pick


@pytest.mark.parametrize("seed", range(5))
def test_joint_program_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((4, 2)) * np.array([2.0, 0.2])
    costs = {"latency": rng.uniform(1, 3, (4, 2)) * np.array([0.7, 1.0])}
    groups = [
        (np.r_[0.0, rng.random(2)], {"latency": np.r_[0.0, -rng.uniform(0.5, 2, 2)]})
        for _ in range(2)
    ]
    budgets = {"latency": float(costs["latency"][:, 1].sum() * 0.7)}
    want, _ = brute_force(scores, costs, budgets, groups)
    choice, picks = allocate_with_groups(scores, costs, budgets, None, groups)
    got = assignment_total(scores, choice) + sum(
        g[0][p] for g, p in zip(groups, picks, strict=True)
    )
    assert np.isfinite(want) and got == pytest.approx(want, abs=1e-9)
    spent = assignment_total(costs["latency"], choice)
    spent += sum(g[1]["latency"][p] for g, p in zip(groups, picks, strict=True))
    assert spent <= budgets["latency"] + 1e-9


def test_joint_floor_counts_group_savings():
    c = {"t": np.array([[2.0, 3.0]])}
    g = [(np.array([0.0, 1.0]), {"t": np.array([0.0, -1.0])})]
    with pytest.raises(CompactnnError, match="smallest reachable 1"):
        allocate_with_groups(np.zeros((1, 2)), c, {"t": 0.5}, None, g)
    choice, picks = allocate_with_groups(np.zeros((1, 2)), c, {"t": 1.0}, None, g)
    assert choice.tolist() == [0] and picks == [1]


def test_group_sensitivity_and_bytes_match_the_real_removal():
    model, calib = block_model()
    fmts = parse_formats("ch50+w8a8,w8a8")
    (g,) = measure_groups(model, NAMES, [0.5], fmts[1], None, calib, calib[0], [0] * 4, None)
    assert g.layers == ("stem", "b") and g.scores[0] == 0
    recipe = build_recipe("p", NAMES, fmts, [1, 1, 1, 1], groups=[(g.layers, 0.5)])
    assert recipe.steps[0].method == "channel"
    assert set(recipe.steps[0].targets.names) == {"stem", "b"}
    pruned = compactnn.compress(model, Recipe("p", recipe.steps[:1]), calib_data=calib[:1])
    shapes = [tuple(pruned.get_submodule(n).weight.shape[:2]) for n in NAMES]
    assert shapes == [(2, 1), (8, 2), (2, 8), (3, 72)]  # stream halved, consumers' inputs too
    with torch.no_grad():  # independent: the float output error of the pruned model
        num = sum(float((pruned(x) - model(x)).double().pow(2).sum()) for x in calib)
        den = sum(float(model(x).double().pow(2).sum()) for x in calib)
    assert g.scores[1] == pytest.approx(num / den, rel=1e-6) and num / den > 1e-3
    removed = 2 * 9 + 2 * 72 + 8 * 2 * 9 + 3 * 72  # weights of stem, b, a's and head's inputs
    assert g.costs["code_bits"][1] == -8 * removed
    # bytes at w8a8: codes, per-row fp16 scale + zero, bias of removed rows (stem 2, b 2)
    assert g.costs["bytes"][1] == -(removed + 2 * 3 * (2 + 2) + 0)


def test_search_prunes_the_group_when_only_it_fits_the_budget():
    model, calib = block_model()
    r = search(
        model,
        formats="ch50+w8a8,w8a8",
        budget=Budget(avg_bits=5),  # only the stream (522 of 1,044 weights) saves enough
        calib_data=calib,
        groups=True,  # without latency_example: no latency column, no deployment
        progress=False,
    )
    assert [g["layers"] for g in r.groups] == [["stem", "b"]]
    assert r.groups[0]["chosen"] == "ch50" and r.assignment["a"] == "w8a8"
    assert "latency" not in r.groups[0]["costs"] and not r.latency
    q = compactnn.compress(model, r.recipe, calib_data=calib, progress=False)
    assert q.stem.weight.shape[0] == 2 and q.head.weight.shape[1] == 72
    assert r.cost["code_bits"] <= 5 * 1044 + 1e-9


def test_group_requests_checked():
    model, calib = block_model()
    with pytest.raises(CompactnnError, match="groups=True needs ch<P>"):
        search(
            model,
            formats="w4a8,w8a8",
            budget=Budget(avg_bits=6),
            calib_data=calib,
            groups=True,
            progress=False,
        )
