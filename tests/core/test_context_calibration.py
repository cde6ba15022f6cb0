"""``CompressContext.require_calibration``: the message without data, and the warning with
too few samples, counted in words that agree with the number."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from compactnn.core.context import CompressContext
from compactnn.errors import CompactnnError


def _error(recommended: int) -> str:
    with pytest.raises(CompactnnError) as exc:
        CompressContext().require_calibration("channel pruning", recommended)
    return str(exc.value)


def test_a_method_that_reads_one_example_says_one_sample_is_enough():
    assert _error(1) == (
        "channel pruning needs calibration data: pass calib_data= (a tensor of inputs or an "
        "iterable of batches; one sample is enough)."
    )


def test_a_method_that_needs_statistics_recommends_a_count():
    assert _error(64).endswith("iterable of batches; about 64 samples are recommended).")


@pytest.mark.parametrize(
    ("n", "words"),
    [(1, "only 1 calibration sample was given"), (3, "only 3 calibration samples were given")],
)
def test_too_few_samples_warn_in_agreeing_words(n, words):
    ctx = CompressContext(batches=[torch.zeros(n, 4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx.require_calibration("wanda", 64)
    assert [str(w.message) for w in caught] == [
        f"wanda: {words}; 64 or more are recommended for a stable result."
    ]


class _Blocks(torch.nn.Module):
    """Two identical blocks (GPTQ runs block by block)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()) for _ in range(2)
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("recipe", ["w4-g32-gptq", "w8a8-smoothquant"])
def test_too_few_samples_warning_points_at_the_callers_compress_line(recipe):
    import compactnn

    torch.manual_seed(0)
    model = _Blocks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        compactnn.compress(model, recipe, calib_data=torch.randn(4, 64), progress=False)
    few = [w for w in caught if "recommended for a stable result" in str(w.message)]
    assert few, [str(w.message) for w in caught]
    assert {(w.filename, w.lineno) for w in few} == {(__file__, line)}
