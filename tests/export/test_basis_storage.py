"""Codebook layers in the artifact: binary bases stored as their coefficients, no unused
scale or zero point, older artifacts (with them) still loading, sizes as stored."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import compactnn
from compactnn.core.basis import basis_levels
from compactnn.core.modules import set_module
from compactnn.core.packing import packed_nbytes
from compactnn.core.qlayers import make_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.errors import ArtifactError
from compactnn.export.size import theoretical_size

SPEC2 = QuantSpec(bits=2, symmetric=True, granularity="channel")


def skeleton():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def basis_model(sparse_codes=False):
    """Conv: 2 bases per filter; Linear: a 4-level asymmetric codebook."""
    model = skeleton()
    g = torch.Generator().manual_seed(1)
    conv = make_quant_layer(model[0], SPEC2, None)
    basis = torch.rand(4, 1, 2, generator=g).half().float()
    codes = torch.randint(-2, 2, conv.weight.shape, generator=g)
    if sparse_codes:  # code 0 (the zero point) almost everywhere: stored sparse
        codes = torch.where(torch.rand(codes.shape, generator=g) < 0.9, 0, codes)
    conv.set_codebook(None, basis=basis)
    conv.set_quantized_weight(codes, torch.ones(4, 1), torch.zeros(4, 1))
    set_module(model, "0", conv)
    aspec = QuantSpec(bits=2, symmetric=False, granularity="channel")
    lin = make_quant_layer(model[3], aspec, None)
    lin.set_codebook(torch.tensor([-1.0, -0.25, 0.5, 2.0]).expand(3, 1, 4))
    lin.set_quantized_weight(
        torch.randint(0, 4, lin.weight.shape, generator=g), torch.ones(3, 1), torch.zeros(3, 1)
    )
    set_module(model, "3", lin)
    return model.eval(), basis


def test_basis_is_stored_as_coefficients_and_reloads_bit_exactly(tmp_path):
    model, basis = basis_model()
    x = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    compactnn.save(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "model.safetensors"))
    header = json.loads((tmp_path / "a" / "compactnn.json").read_text())
    assert header["layers"]["0"]["format"] == "int2-sym-channel-basis"
    assert header["layers"]["3"]["format"] == "uint2-asym-channel-codebook"
    assert {k for k in tensors if k.startswith("0.")} == {
        "0.weight.packed",
        "0.weight.basis",
        "0.bias",
    }
    assert {k for k in tensors if k.startswith("3.")} == {
        "3.weight.packed",
        "3.weight.levels",
        "3.bias",
    }
    assert torch.equal(tensors["0.weight.basis"].float(), basis)
    assert tensors["0.weight.basis"].dtype == torch.float16
    loaded = compactnn.load(tmp_path / "a", model=skeleton())
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[0].weight_levels, basis_levels(basis))
    assert loaded[0].format.endswith("-basis") and torch.equal(loaded[0].weight_basis, basis)
    # bytes by hand: conv 72 weights x 2 bits = 18 B codes + 4 filters x 2 x 2 B + bias 16 B;
    # linear 192 x 2 bits = 48 B + 3 x 4 x 2 B levels + bias 12 B
    assert theoretical_size(model) == (18 + 16 + 16) + (48 + 24 + 12)
    assert packed_nbytes(72, 2) == 18


def test_sparse_codes_of_a_codebook_layer_without_scale_reload_exactly(tmp_path):
    model, _ = basis_model(sparse_codes=True)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    compactnn.save(model, tmp_path / "a")
    header = json.loads((tmp_path / "a" / "compactnn.json").read_text())
    assert "0.weight.packed" in header["sparse"]
    assert torch.equal(compactnn.load(tmp_path / "a", model=skeleton())(x), model(x))


def test_artifacts_that_store_the_unused_scale_and_zero_still_load(tmp_path, rewrite_tensors):
    model, _ = basis_model()
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    root = tmp_path / "a"
    compactnn.save(model, root)
    tensors = load_file(str(root / "model.safetensors"))
    tensors["0.weight.scale"] = torch.ones(4, 1, dtype=torch.float16)  # as written before
    tensors["3.weight.scale"] = torch.ones(3, 1, dtype=torch.float16)
    tensors["3.weight.zero"] = torch.zeros(3, 1, dtype=torch.uint8)
    rewrite_tensors(root, tensors)
    assert torch.equal(compactnn.load(root, model=skeleton())(x), model(x))
    tensors["3.weight.scale"] = torch.zeros(3, 1, dtype=torch.float16)  # still checked
    rewrite_tensors(root, tensors)
    with pytest.raises(ArtifactError, match="scale"):
        compactnn.load(root, model=skeleton())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.fill_(float("nan")), "non-finite"),
        (lambda t: t[..., :1].clone(), "float16 \\[4, 1, 1\\]"),
    ],
)
def test_damaged_basis_is_refused(tmp_path, edit, message, rewrite_tensors):
    model, _ = basis_model()
    root = tmp_path / "a"
    compactnn.save(model, root)
    tensors = load_file(str(root / "model.safetensors"))
    out = edit(tensors["0.weight.basis"])
    tensors["0.weight.basis"] = out if out is not None else tensors["0.weight.basis"]
    rewrite_tensors(root, tensors)
    with pytest.raises(ArtifactError, match=message):
        compactnn.load(root, model=skeleton())
