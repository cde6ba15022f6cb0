"""train_dafl refuses an input shape its generator cannot make, naming a call that exists."""

import inspect

import pytest

from compactnn.datafree import generate, train_dafl
from compactnn.errors import CompactnnError


def test_a_side_not_a_multiple_of_4_points_at_generate_with_bn_inversion(tiny_teacher):
    with pytest.raises(CompactnnError) as err:
        train_dafl(tiny_teacher, None, input_shape=(1, 6, 6), steps=1, progress=False)
    text = str(err.value)
    assert "multiples of 4; input_shape=(1, 6, 6) is not" in text
    assert (
        "compactnn.datafree.generate(model, n, input_shape=(1, 6, 6), method='bn-inversion')"
        in (text)
    )
    assert "method" not in inspect.signature(train_dafl).parameters  # so it must name generate
    assert "bn-inversion" in inspect.signature(generate).parameters["method"].default
