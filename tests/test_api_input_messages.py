"""compress names the fix for inputs of the wrong kind: numpy calibration batches
(torch.from_numpy) and a model given by name or path (load it first)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import compactnn
from compactnn.api import not_a_module
from compactnn.errors import CompactnnError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_numpy_calibration_data_names_torch_from_numpy():
    batch = np.random.default_rng(0).standard_normal((4, 4))
    with pytest.raises(CompactnnError) as info:
        compactnn.compress(_model(), "w4a8", calib_data=[batch], progress=False)
    assert str(info.value) == (
        "calibration batch 0 is a numpy ndarray; expected a tensor: convert each batch with "
        "torch.from_numpy(array) (numpy's float64 is cast to the model's dtype)."
    )
    with pytest.raises(CompactnnError) as info:
        compactnn.compress(_model(), "w4a8", calib_data=batch, progress=False)
    assert str(info.value) == (
        "calib_data is a numpy ndarray; pass a tensor: calib_data=torch.from_numpy(array)."
    )
    q = compactnn.compress(  # the fix the message gives works as it says
        _model(), "w4a8", calib_data=[torch.from_numpy(batch)], progress=False
    )
    assert q(torch.zeros(1, 4)).shape == (1, 2)


def test_a_model_given_by_name_or_path_says_how_to_load_it(tmp_path):
    with pytest.raises(CompactnnError) as info:
        compactnn.compress("mnist-cnn", "w4a8")
    assert str(info.value) == (
        "model must be a torch.nn.Module, got the string 'mnist-cnn': load it first: a "
        "reference model as compactnn.models.load_reference('mnist-cnn').model (its .calib "
        "is calibration data), or on the command line `compactnn compress mnist-cnn "
        "--recipe w4a8 --out DIR`."
    )
    message = not_a_module(tmp_path, "w8")
    assert message.startswith(f"model must be a torch.nn.Module, got the string {str(tmp_path)!r}")
    assert "from_pretrained" in message and "max_memory=" in message
    assert not_a_module(3) == "model must be a torch.nn.Module, got int."
