"""The first/last-layer rule says which layers it raised and how to turn it off; when it
raises every layer a step quantizes (a w4a8 autoencoder whose ConvTranspose2d layers are not
quantizable layers), compress warns: the artifact is the w8a8 one."""

import warnings

import torch
from torch import nn

import compactnn


def _compress(model, recipe, x):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = compactnn.compress(model, recipe, calib_data=x, progress=False)
    return q, [str(w.message) for w in rec]


def test_a_w4a8_step_whose_every_layer_is_raised_warns_and_names_the_way_out():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 4, stride=4),
    ).eval()
    q, said = _compress(model, "w4a8", torch.randn(16, 1, 8, 8))
    assert q[0].weight_spec.bits == q[2].weight_spec.bits == 8  # the premise: both raised
    raised = [s for s in said if "first/last-layer rule" in s]
    assert len(raised) == 1
    assert "raised every layer this step quantizes to w8a8 (0, 2:" in raised[0]
    assert "no layer is at the recipe's w4a8" in raised[0]
    assert "first_last_bits: null" in raised[0]


def test_raised_ends_are_noted_when_middle_layers_keep_the_recipes_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note, not a warning
        q = compactnn.compress(model.eval(), "w4a8", calib_data=torch.randn(32, 8), progress=False)
    assert q[2].weight_spec.bits == 4
    notes = [n for n in compactnn.info_of(q)["notes"] if "first/last-layer rule" in n]
    assert notes == [
        "first/last-layer rule (first_last_bits=8): 0, 3 at w8a8 instead of w4a8; "
        "first_last_bits: null in the step's config of a YAML recipe (Python: the method's "
        "config with first_last_bits=None) quantizes them like the rest"
    ]
