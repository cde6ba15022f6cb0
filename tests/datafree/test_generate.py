import pytest
import torch

from compactnn.datafree import generate, invert_bn
from compactnn.errors import CompactnnError


@pytest.mark.parametrize("method", ["bn-inversion", "dafl"])
@pytest.mark.parametrize("steps", [0, -5, 2.5, True])
def test_steps_below_one_or_not_an_integer_are_refused(tiny_teacher, method, steps):
    """steps=0 used to run the default (steps or 200), steps=-5 returned the starting
    noise labelled bn-inversion."""
    with pytest.raises(CompactnnError, match=rf"steps={steps!r}: pass a positive number"):
        generate(tiny_teacher, 4, input_shape=(1, 8, 8), method=method, steps=steps)
    if method == "bn-inversion":
        with pytest.raises(CompactnnError, match=r"steps=.*steps=None for the default \(200\)"):
            invert_bn(tiny_teacher, 4, input_shape=(1, 8, 8), steps=steps, progress=False)


def test_steps_none_is_the_default_and_a_given_count_is_run(tiny_teacher):
    one = generate(tiny_teacher, 4, input_shape=(1, 8, 8), steps=1, progress=False)
    ref = invert_bn(tiny_teacher, 4, input_shape=(1, 8, 8), steps=1, progress=False)
    assert one.cost["steps"] == 1
    torch.testing.assert_close(one.x, ref.x)
    start = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(one.x, start)  # one Adam step moved the starting noise


@pytest.mark.parametrize("method", ["bn-inversion", "dafl"])
@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_a_count_below_one_is_refused_before_any_work(tiny_teacher, method, n):
    """DAFL with n=0 trained its generator, then crashed reshaping 0 elements."""
    with pytest.raises(CompactnnError, match=rf"n={n!r}: ask for at least one input"):
        generate(tiny_teacher, n, input_shape=(1, 8, 8), method=method, steps=1)


@pytest.mark.parametrize("method", ["bn-inversion", "dafl"])
def test_an_input_shape_string_is_read_like_the_cli(tiny_teacher, method):
    a = generate(tiny_teacher, 4, input_shape="1,8,8", method=method, steps=2, progress=False)
    b = generate(tiny_teacher, 4, input_shape=(1, 8, 8), method=method, steps=2, progress=False)
    torch.testing.assert_close(a.x, b.x)
    torch.testing.assert_close(a.y, b.y)


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(CompactnnError, match=r"model is a str, not a torch.nn.Module"):
        generate("mynet.safetensors", 4, input_shape=(1, 8, 8))
