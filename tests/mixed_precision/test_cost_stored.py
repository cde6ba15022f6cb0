"""The search's byte price of each layer equals what the saved artifact stores for it."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.export.artifact import pack_state
from compactnn.mixed_precision.api import build_recipe
from compactnn.mixed_precision.cost import biased_layers, cost_tables
from compactnn.mixed_precision.formats import parse_formats

# the method families search accepts: uniform grids, and the training-aware formats, whose
# codebooks (float16 levels or binary basis, no scales) change the stored tensors (ch<P>+
# formats are priced on their own rows only, a documented proxy: not here)
FORMATS = [
    "w2a8",
    "w4a8",
    "w8a8",
    "w4-g16",
    "w3-g16-mse",
    "w2-sketch",
    "w1a8-subbit",
    "w2a8-pe50",
    "w2a8-ttq",
    "w2a2-lsq",
]


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),  # folded: the conv gets a bias in the artifact
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 16),
    ).eval()


def _stored(model, name: str) -> int:
    tensors, _, _ = pack_state(model)
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(name + "."))


@pytest.mark.parametrize("fmt", FORMATS)
def test_priced_bytes_equal_the_stored_bytes(fmt):
    model = _cnn()
    x = torch.randn(16, 16, 8, 8)
    fmts = parse_formats([fmt, "w8a8" if fmt != "w8a8" else "w4a8"])
    names = ["0", "3", "7", "9"]
    layers = {n: model.get_submodule(n) for n in names}
    costs = cost_tables(layers, fmts, None, biased_layers(model, names))
    recipe = build_recipe("u", names, fmts, [0] * len(names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "calibrated only, not trained"
        q = compactnn.compress(model, recipe, calib_data=[x], progress=False)
    stored = [_stored(q, n) for n in names]
    assert costs["bytes"][:, 0].tolist() == stored
