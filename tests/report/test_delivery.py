"""What the user gets: a channel-pruned model is delivered as itself, on its fastest float
path, never as "simulated"; quantized models keep going through ``deploy``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.measure.float_paths import EAGER, FloatPaths
from compactnn.measure.timing import Timing
from compactnn.report import delivery
from compactnn.report.delivery import SIMULATED, deliver_float, is_plain_float

X = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 3)
    ).eval()


def _compress(model: nn.Module, recipe: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "channel pruning skipped: 3 (the outputs)"
        return compactnn.compress(model, recipe, calib_data=X, progress=False)


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    model = _compress(_cnn(), "ch50")
    assert model[0].out_channels == 4  # really fewer channels
    return model


def test_a_channel_pruned_model_is_plain_float_and_a_quantized_one_is_not(pruned):
    assert is_plain_float(pruned) and is_plain_float(_cnn())
    assert not is_plain_float(_compress(_cnn(), "w8a8"))
    assert not is_plain_float(_compress(pruned, "w8a8"))  # pruned, then quantized: deploy


def test_deliver_float_times_the_pruned_model_itself_and_names_the_runtime(pruned, monkeypatch):
    seen = []

    def spy(model, example, **kwargs):
        seen.append((model, kwargs))
        t = Timing(median_s=1e-3, min_s=1e-3, max_s=1e-3, runs=3, warmup=2, threads=1)
        return model, FloatPaths({EAGER: t}, {"torch.compile": "not tried in quick mode"})

    monkeypatch.setattr(delivery, "fastest_float_form", spy)
    fast, runtime, notes = deliver_float(pruned, X[:8], quick=False, threads=1)
    assert [m for m, _ in seen] == [pruned] and fast is pruned
    assert seen[0][1] == {"quick": False, "threads": 1}
    assert runtime == "PyTorch fp32" != SIMULATED
    assert notes[0].startswith("runs natively: a plain float model")
    assert "PyTorch fp32 1.00 ms" in notes[0] and "skipped torch.compile" in notes[0]


def test_deliver_float_races_the_float_paths_and_keeps_the_outputs(pruned):
    fast, runtime, _ = deliver_float(pruned, X[:8], quick=True, threads=1)
    assert runtime in delivery.FLOAT_PATH_NAMES.values()
    with torch.no_grad():
        ref, out = pruned(X), fast(X)  # another batch size than the race's
    # fp32 paths differ by summation order; bf16 autocast keeps 8 mantissa bits
    assert (out.float() - ref).abs().max() <= 5e-2 * ref.abs().max()
