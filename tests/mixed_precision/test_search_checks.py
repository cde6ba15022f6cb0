"""search refuses what it cannot use in one line (data the model cannot run, a budget that is
not a Budget, an impossible first_last_min_bits) and warns where a request does not act
(a limit that cannot bind, training-aware formats that are only calibrated)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.mixed_precision import Budget, search
from compactnn.mixed_precision.budget import warn_unbound


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    )
    return model.eval(), [torch.randn(8, 1, 6, 6) for _ in range(2)]


def _search(**kw):
    model, calib = _cnn()
    kw = {"formats": "w2a8,w8a8", "budget": Budget(avg_bits=5), "calib_data": calib, **kw}
    return search(model, progress=False, **kw)


def test_data_the_model_cannot_run_is_refused_as_compress_refuses_it():
    with pytest.raises(CompactnnError, match=r"could not run on the calibration data") as e:
        _search(calib_data=torch.randn(8, 3, 6, 6))
    assert "Expected input: (N, C, H, W) with C=1" in str(e.value)


def test_a_dict_of_budget_fields_is_a_budget():
    a = _search(budget={"avg_bits": 5})
    b = _search(budget=Budget(avg_bits=5))
    assert a.assignment == b.assignment and a.budget == {"avg_bits": 5}


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        (3, r"budget=3 is not a Budget: pass Budget\(avg_bits=3\)"),
        ({"bits": 3}, r"unknown field 'bits'; a budget dict takes max_bytes, avg_bits"),
        ({"avg_bits": -1}, r"Budget.avg_bits=-1 must be a positive"),
    ],
)
def test_a_budget_that_is_not_one_is_refused_by_name(budget, match):
    with pytest.raises(CompactnnError, match=match):
        _search(budget=budget)


@pytest.mark.parametrize("bits", [0, -3, 17, 2.5, True, "8"])
def test_first_last_min_bits_out_of_range_is_refused(bits):
    with pytest.raises(CompactnnError, match=r"first_last_min_bits=.* from 1 to 16"):
        _search(first_last_min_bits=bits)


def test_a_budget_every_assignment_meets_warns_that_it_does_not_bind():
    with pytest.warns(UserWarning, match=r"avg_bits: 300.00 bits/weight does not bind: .* 8.00"):
        r = _search(budget=Budget(avg_bits=300))
    assert set(r.assignment.values()) == {"w8a8"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a binding budget: no warning
        _search(budget=Budget(avg_bits=5))


def test_a_latency_ratio_no_assignment_reaches_warns():
    table = {"latency": np.array([[1.0, 2.0], [1.0, 3.0]])}  # ms; widest format: 2 ms in all
    allowed = np.ones((2, 2), bool)
    with pytest.warns(UserWarning, match=r"max_latency_ratio: 5.00 x .* does not bind: .* 2.50"):
        warn_unbound(Budget(max_latency_ratio=5), table, allowed, [], 10.0, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1.2 x 2 ms < 5 ms: binds
        warn_unbound(Budget(max_latency_ratio=1.2), table, allowed, [], 10.0, 2.0)


def test_training_aware_formats_warn_once_that_they_are_only_calibrated():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _search(formats="w2a8-ttq,w2a2-lsq,w8a8")
    notes = [str(w.message) for w in seen if "training-aware" in str(w.message)]
    assert len(notes) == 1
    assert "w2a8-ttq, w2a2-lsq are training-aware" in notes[0]
    assert "calibrated only, not trained" in notes[0]
