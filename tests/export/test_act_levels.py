"""Non-uniform activation grids in the artifact: ``{layer}.input.levels`` (float16) next to
``input.qparams``, loaded bit-exactly, damaged ones refused."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import compactnn
from compactnn.core.basis import binary01_levels
from compactnn.core.modules import set_module
from compactnn.core.qlayers import quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.errors import ArtifactError

V = torch.tensor([0.75, 0.5, 0.125])  # LQ-Nets style {0,1} basis: levels v^T b, 8 of them


def skeleton():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def model_with_levels():
    model = skeleton()
    wspec = QuantSpec(bits=4, symmetric=True, granularity="channel")
    aspec = QuantSpec(bits=3, symmetric=False)
    for name in ("0", "2"):
        q = quantize_layer_rtn(model.get_submodule(name), wspec, aspec)
        q.input_quantizer.set_qparams(torch.tensor(0.1), torch.tensor(0.0))
        set_module(model, name, q)
    model[2].input_quantizer.set_levels(binary01_levels(V).sort().values)
    return model.eval()


def test_levels_are_stored_and_reload_bit_exactly(tmp_path):
    model = model_with_levels()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    compactnn.save(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert "0.input.levels" not in tensors  # a uniform grid stores scale and zero only
    assert tensors["2.input.levels"].dtype == torch.float16
    # v^T b over b in {0,1}^3, sorted: 0, .125, .5, .625, .75, .875, 1.25, 1.375
    assert tensors["2.input.levels"].tolist() == [0, 0.125, 0.5, 0.625, 0.75, 0.875, 1.25, 1.375]
    loaded = compactnn.load(tmp_path / "a", model=skeleton())
    assert loaded[0].input_quantizer.is_uniform and not loaded[2].input_quantizer.is_uniform
    assert torch.equal(loaded(x), model(x))
    # the second layer's input takes only the 8 levels (its ReLU input is >= 0)
    seen = []
    loaded[2].register_forward_pre_hook(lambda m, a: seen.append(m.input_quantizer(a[0])))
    loaded(x)
    assert set(seen[0].unique().tolist()) <= set(tensors["2.input.levels"].float().tolist())


@pytest.mark.parametrize(
    ("key", "edit", "message"),
    [
        ("2.input.levels", lambda t: t.flip(0), "increasing order"),
        ("2.input.levels", lambda t: t[:4].clone(), "float16 \\[8\\]"),
        ("0.input.levels", None, None),  # added to a layer: must be 8 float16 levels too
    ],
)
def test_damaged_levels_are_refused(tmp_path, key, edit, message, rewrite_tensors):
    root = tmp_path / "a"
    compactnn.save(model_with_levels(), root)
    tensors = load_file(str(root / "model.safetensors"))
    if edit is None:
        tensors[key] = torch.tensor([0.0, 1.0, 0.5, 2.0, 3.0, 4.0, 5.0, 6.0]).half()
        message = "increasing order"
    else:
        tensors[key] = edit(tensors[key])
    rewrite_tensors(root, tensors)
    with pytest.raises(ArtifactError, match=message):
        compactnn.load(root, model=skeleton())
