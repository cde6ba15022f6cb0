"""One-line refusals for a bad deploy example (compress's "Expected input" hint) and, for the
model it came from, a float64 or TorchScript model handed to compress (tester session 27:
raw torch errors, a 54-line CLI traceback, or "rewrite them as nn.Linear")."""

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from tests.deployment.conftest import make_net

HINT = "Expected input: float32 values of shape (N, C, H, W) with C=3 (first layer 'stem.0')."


@pytest.mark.parametrize(
    ("example", "spec"),
    [
        (torch.randn(4, 1, 16, 16), "float32 values of shape (4, 1, 16, 16)"),  # channels
        (torch.randn(3, 16, 16), "float32 values of shape (3, 16, 16)"),  # no batch dimension
    ],
)
@pytest.mark.parametrize("backend", ["onednn", "auto"])
def test_a_bad_example_is_refused_with_the_input_the_model_takes(qnet, example, spec, backend):
    qmodel, _ = qnet
    with pytest.raises(CompactnnError) as caught:
        compactnn.deploy(qmodel, backend, example=example, time_float=False)
    text = str(caught.value)
    assert text.startswith(f"the model does not run on example= ({spec}): ")
    assert text.endswith(HINT) and "\n" not in text


def test_a_float64_model_is_refused_before_any_work():
    x = torch.randn(16, 3, 16, 16)
    for data in (x, x.double()):
        with pytest.raises(CompactnnError) as caught:
            compactnn.compress(make_net().double(), "w8a8", calib_data=data, progress=False)
        assert str(caught.value) == (
            "model tensor 'stem.0.weight' is torch.float64; compactnn compresses float32 models "
            "(its quantized layers and integer kernels compute in float32): call model.float() "
            "first (and pass float32 calib_data)."
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_keep_their_refusal(dtype):
    with pytest.raises(CompactnnError, match=rf"is {dtype}; .*call model.float\(\) first"):
        compactnn.compress(make_net().to(dtype), "w8a8", calib_data=torch.randn(8, 3, 16, 16))


def test_a_torchscript_module_is_named_as_such():
    scripted = torch.jit.script(make_net())
    with pytest.raises(CompactnnError) as caught:
        compactnn.compress(scripted, "w8a8", calib_data=torch.randn(8, 3, 16, 16))
    assert str(caught.value) == (
        "the model is a TorchScript module (RecursiveScriptModule, from torch.jit.script or "
        "torch.jit.trace), whose layers compactnn cannot replace: pass the nn.Module before "
        "scripting (compress it, then script or export the result)."
    )
