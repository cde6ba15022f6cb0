"""Accuracy-aware search: what eval_fn must return and which max_drop makes sense."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.mixed_precision import Budget, search
from compactnn.mixed_precision.accuracy import check_drop_vs_baseline, quality_of

FORMATS = ["w2a8", "w4a8", "w8a8"]


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return model, [torch.randn(16, 8) for _ in range(2)]


def run(eval_fn, max_drop=1.0, **kw):
    model, calib = tiny()
    return search(
        model,
        formats=FORMATS,
        calib_data=calib,
        eval_fn=eval_fn,
        max_drop=max_drop,
        max_evals=2,
        progress=False,
        **kw,
    )


def test_an_eval_fn_returning_no_number_is_named():
    # before: float(None) raised a raw TypeError
    with pytest.raises(CompactnnError) as e:
        run(lambda m: None)
    assert str(e.value) == (
        "eval_fn must return one finite number (higher is better, e.g. top-1 in percent); "
        "it returned None on the float model: end it with `return accuracy`."
    )
    assert "\n" not in str(e.value)
    with pytest.raises(CompactnnError, match=r"it returned 'good' on the float model"):
        run(lambda m: "good")
    with pytest.raises(CompactnnError, match=r"it returned nan on the float model"):
        run(lambda m: math.nan)
    with pytest.raises(CompactnnError, match=r"it returned a Tensor on the float model"):
        run(lambda m: torch.ones(100))
    calls = []

    def fails_later(m):  # a number on the float model, None on compressed ones
        calls.append(m)
        return 90.0 if len(calls) == 1 else None

    with pytest.raises(CompactnnError, match=r"it returned None on a compressed model"):
        run(fails_later)


def test_numbers_of_every_kind_are_accepted():
    assert quality_of(np.float32(0.5), "x") == 0.5
    assert quality_of(torch.tensor(97.5), "x") == 97.5
    assert quality_of(3, "x") == 3.0
    with pytest.raises(CompactnnError, match="returned True"):
        quality_of(True, "x")
    r = run(lambda m: torch.tensor(90.0))  # a 0-d tensor: every trial passes
    assert r.baseline == 90.0 and all(t["passed"] for t in r.tried)


def test_a_max_drop_no_quality_can_exceed_is_refused():
    # before: max_drop=150 on a percentage (top-1 97.5) was accepted: every model passes
    with pytest.raises(CompactnnError) as e:
        run(lambda m: 97.5, max_drop=150)
    assert str(e.value) == (
        "max_drop=150 is not below the float model's quality 97.5: even a quality of 0 would "
        "pass. Give the largest drop you accept in eval_fn's units (e.g. max_drop=0.97, 1% of "
        "it)."
    )
    check_drop_vs_baseline(0.5, 97.5)  # fine
    check_drop_vs_baseline(5.0, -2.0)  # a negative metric (e.g. -loss): no bound to check
    for bad in (-1, "0.5", math.inf, True):
        with pytest.raises(CompactnnError, match=r"max_drop=.* must be a number >= 0"):
            run(lambda m: 1 / 0, max_drop=bad)  # refused before eval_fn runs


def test_the_frontier_lists_each_allocation_once_as_the_docs_say():
    model, calib = tiny()
    r = search(model, formats=FORMATS, budget=Budget(avg_bits=4), calib_data=calib, progress=False)
    sizes = [p["bytes"] for p in r.frontier]
    assignments = [tuple(p["assignment"].values()) for p in r.frontier]
    assert len(set(assignments)) == len(assignments) <= 8 and sizes == sorted(sizes)
    assert sizes[0] == r.costs["bytes"].min(axis=1).sum()
    assert sizes[-1] == r.costs["bytes"].max(axis=1).sum()
    assert len(r.frontier) < 8  # 2 layers x 3 formats: fewer distinct allocations than budgets
    # before, docs/search.md promised "the allocation at 8 budgets" (the tester counted 6)
    doc = " ".join((Path(__file__).parents[2] / "docs" / "search.md").read_text().split())
    assert "budgets that give the same allocation are listed once" in doc
    assert "allocation at 8 budgets" not in doc
