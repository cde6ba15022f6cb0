"""train's first copy of the model (num_outputs) with the legacy torch.nn.utils.weight_norm."""

import warnings

import torch
from torch import nn

from compactnn.training.data import num_outputs


def test_num_outputs_copies_a_model_with_legacy_weight_norm_and_no_forward():
    """deepcopy raised 'Only Tensors created explicitly by the user (graph leaves) support
    the deepcopy protocol' (train's first step); the model itself is left as it was."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(model[2])
    weight = model[2].weight
    assert num_outputs(model, torch.randn(5, 4)) == 3
    assert model[2].weight is weight and weight.grad_fn is not None
    assert model.training  # never run nor switched to eval
