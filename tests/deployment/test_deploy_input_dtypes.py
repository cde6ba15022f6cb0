"""deploy's example dtype, checked once at its entry, and its float check drawing no random
numbers (tester session 34: ``deploy(q, "auto", example=uint8)`` raised torch's raw
"Input type (unsigned char) and bias type (float)" from the float race, while onednn took
the codes 0..255 silently; float64 examples were refused where compress casts them; and
``deploy(backend="auto")`` advanced the global RNG building its float twin)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment.float_check import float_model
from compactnn.errors import CompactnnError


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(-2, 2) * 60 + 128).to(torch.uint8)


@pytest.mark.parametrize("backend", ["auto", "onednn"])
@pytest.mark.parametrize(
    ("make", "dtype", "cast"),
    [(_pixels, "uint8", "x.float() / 255"), (lambda x: (x * 10).long(), "int64", "x.float()")],
)
def test_an_integer_example_is_refused_naming_the_dtype_and_the_cast(
    qnet, backend, make, dtype, cast
):
    qmodel, calib = qnet
    with pytest.raises(CompactnnError) as caught:
        compactnn.deploy(qmodel, backend, example=make(calib[:4]))
    text = str(caught.value)
    assert text.startswith(f"example= holds {dtype} values (shape (4, 3, 16, 16)), and SmallNet")
    assert "its layer 'stem.0'" in text and f"e.g. {cast}" in text and "\n" not in text


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_float64_or_half_example_is_cast_to_the_models_dtype_as_compress_does(qnet, dtype):
    qmodel, calib = qnet
    x = calib[:4].to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = compactnn.deploy(qmodel, "onednn", example=x)
    assert d.verification.passed and torch.equal(d.example, x.float())  # verified on float32
    assert d.verification.samples == 4 and d.input_dtypes[0] == torch.float32
    with pytest.raises(CompactnnError, match=r"it was deployed for float32 \(the model's dtype"):
        d(x)  # calls take the model's dtype, as documented


def test_deploy_auto_leaves_the_global_rng_as_it_was(qnet):
    qmodel, calib = qnet
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compactnn.deploy(qmodel, "auto", example=calib[:4])
    assert torch.equal(before, torch.get_rng_state())


def test_the_float_twin_draws_no_random_numbers_and_keeps_the_weights(qnet):
    qmodel, _ = qnet
    torch.manual_seed(5)
    before = torch.get_rng_state()
    twin = float_model(qmodel)
    assert torch.equal(before, torch.get_rng_state())
    assert type(twin.stem[0]) is nn.Conv2d and type(twin.fc) is nn.Linear
    assert torch.equal(twin.stem[0].weight, qmodel.stem[0].weight.float())
    assert torch.equal(twin.fc.bias, qmodel.fc.bias)
