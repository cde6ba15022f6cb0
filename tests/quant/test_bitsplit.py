import pytest
import torch
from _ptq_models import images, output_mse, tiny_mlp, tiny_resnet

import compactnn
from compactnn.core.qlayers import is_quant_layer
from compactnn.core.quantize import round_scale
from compactnn.quant.bitsplit import BitSplitConfig, optimise_planes, split_planes
from compactnn.quant.rtn import RTNConfig
from compactnn.recipe import Recipe, Step, parse_short_name


def test_split_planes_stitch_back_exactly():
    q = torch.arange(-7, 8, dtype=torch.float64).reshape(3, 5)
    planes = split_planes(q, 3)
    assert set(planes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    stitched = sum(2**m * planes[m] for m in range(3))
    assert torch.equal(stitched, q)


def test_plane_optimisation_never_increases_the_objective():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    gram, c = x.T @ x, w @ (x.T @ x)
    alpha = w.abs().amax(1) / 7
    q = torch.round(w / alpha[:, None]).clamp(-7, 7)

    def objective(q, a):
        return (a**2 * ((q @ gram) * q).sum(1) - 2 * a * (q * c).sum(1)).sum()

    before = objective(q, alpha)
    q2, a2 = optimise_planes(q.clone(), alpha.clone(), gram, c, bits=4, sweeps=2)
    assert objective(q2, a2) < before
    assert q2.abs().max() <= 7 and torch.equal(q2, q2.round())


def test_stitched_weights_are_exactly_representable():
    m = tiny_resnet()
    q = compactnn.compress(m, "w3a8-bitsplit", calib_data=images(64), progress=False)
    checked = 0
    for _, layer in q.named_modules():
        if not is_quant_layer(layer):
            continue
        bits = layer.weight_spec.bits
        codes = layer.weight_codes.float()
        assert codes.abs().max() <= 2 ** (bits - 1) - 1
        assert torch.equal(layer.weight_scale, round_scale(layer.weight_scale))
        scale = layer.weight_scale.reshape((-1,) + (1,) * (codes.dim() - 1))
        assert torch.equal(layer.weight, codes * scale)  # dequantized weight: codes x scale
        checked += 1
    assert checked == 4


def test_beats_round_to_nearest_on_the_same_grid():
    m = tiny_mlp()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    held_out = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    grid = BitSplitConfig.from_short(3, 8, None)  # symmetric, MSE-searched start
    same_grid = Recipe("rtn", (Step("rtn", RTNConfig(weight=grid.weight, act=grid.act)),))
    rtn = compactnn.compress(m, same_grid, calib_data=x, progress=False)
    bs = compactnn.compress(m, "w3a8-bitsplit", calib_data=x, progress=False)
    assert output_mse(bs, m, held_out) < 0.8 * output_mse(rtn, m, held_out)


def test_saved_artifact_gives_identical_outputs(tmp_path):
    m = tiny_resnet()
    x = images(64)
    q = compactnn.compress(m, "w4a4-bitsplit", calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "a")
    q2 = compactnn.load(tmp_path / "a", model=tiny_resnet())
    assert torch.equal(q2(x), q(x))


def test_group_names_and_asymmetric_weights_are_refused():
    with pytest.raises(compactnn.CompactnnError, match="per channel"):
        parse_short_name("w4a8-g16-bitsplit")
    weight = BitSplitConfig().weight.__class__(bits=4, symmetric=False)
    with pytest.raises(compactnn.CompactnnError, match="symmetric"):
        BitSplitConfig(weight=weight)
