"""How an example batch is named in messages, and which forms ``check_example`` takes."""

import pytest
import torch

from compactnn.core.calib import check_example, input_spec
from compactnn.errors import CompactnnError


def test_input_spec_names_a_list_a_list_and_a_tuple_a_tuple():
    x = torch.zeros(8, 1, 4, 4)
    assert input_spec([x]) == "a list [float32 values of shape (8, 1, 4, 4)]"
    assert input_spec((x,)) == "a tuple (float32 values of shape (8, 1, 4, 4))"
    assert input_spec({"x": x}) == "keywords x=float32 values of shape (8, 1, 4, 4)"


def test_a_list_example_is_refused_with_the_forms_it_takes():
    """example=[x] was read as a tuple and reached forward as one list argument."""
    x = torch.zeros(8, 1, 4, 4)
    with pytest.raises(CompactnnError) as err:
        check_example([x, x])
    said = str(err.value)
    assert said.startswith("example= is a list [float32 values of shape (8, 1, 4, 4), float32")
    assert "a tensor, a tuple of tensors" in said and "a dict of named tensors" in said
    assert "tuple(example)" in said and "(example,)" in said
    check_example((x, x))  # the tuple is taken
    check_example(([x, x],))  # a forward that takes a list: the list inside a tuple
