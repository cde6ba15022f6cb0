"""`compactnn train --data data-free` names the file to generate (T4)."""

import pytest

from compactnn.commands.train import labelled_data
from compactnn.errors import CompactnnError


def test_train_data_free_names_the_file_to_generate():
    with pytest.raises(CompactnnError, match=r"does not generate its training data") as err:
        labelled_data("data-free")
    assert "'y': data.y" in str(err.value) and "--data synthetic.safetensors" in str(err.value)
