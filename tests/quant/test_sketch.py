import itertools
import json
import struct

import pytest
import torch

import compactnn
from compactnn.core.basis import basis_levels, basis_of_levels
from compactnn.core.packing import packed_nbytes
from compactnn.core.qlayers import is_quant_layer
from compactnn.errors import CompactnnError
from compactnn.export.artifact import pack_model
from compactnn.quant.base import short_weight_spec
from compactnn.quant.sketch import (
    SketchConfig,
    SketchWeight,
    alternate,
    bases_of_codes,
    least_squares,
    reconstruct,
    sketch_direct,
    sketch_error,
    sketch_rows,
)
from tests.quant._ptq_models import images, tiny_resnet


def test_direct_two_basis_sketch_by_hand():
    w = torch.tensor([[1.5, -0.5, 0.5, -1.0]])
    bases, alpha = sketch_direct(w, 2)
    # b1 = sign(w), a1 = mean|w| = 0.875; r1 = (0.625, 0.375, -0.375, -0.125)
    # b2 = sign(r1), a2 = mean|r1| = 0.375
    assert torch.equal(bases[0, :, 0], torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert torch.equal(bases[0, :, 1], torch.tensor([1.0, 1.0, -1.0, -1.0]))
    assert torch.allclose(alpha, torch.tensor([[0.875, 0.375]]))
    codes, levels = sketch_rows(w, 2, refine=False)
    # levels (-a1-a2, -a1+a2, a1-a2, a1+a2); code bits (b1 > 0, b2 > 0), MSB first
    assert torch.equal(levels, torch.tensor([[-1.25, -0.5, 0.5, 1.25]]))
    assert torch.equal(codes, torch.tensor([[3, 1, 2, 0]]))
    assert torch.equal(reconstruct(codes, levels), torch.tensor([[1.25, -0.5, 0.5, -1.25]]))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_refined_error_never_above_direct_per_row(m):
    w = torch.randn(64, 36, generator=torch.Generator().manual_seed(m))
    direct = sketch_error(w, *sketch_rows(w, m, refine=False))
    refined = sketch_error(w, *sketch_rows(w, m, refine=True))
    assert (refined <= direct + 1e-6).all()
    if m >= 2:  # the refinement buys something on Gaussian filters
        assert refined.sum() < 0.97 * direct.sum()


def test_m1_refined_is_the_least_squares_optimum():
    # one basis: sign(w) with a = mean|w| is already optimal; refinement keeps its error
    w = torch.randn(16, 27, generator=torch.Generator().manual_seed(3))
    direct = sketch_error(w, *sketch_rows(w, 1, refine=False))
    refined = sketch_error(w, *sketch_rows(w, 1, refine=True))
    assert torch.allclose(refined, direct, rtol=1e-2)


def test_alternating_error_is_non_increasing_and_coefficients_are_least_squares():
    w = torch.randn(32, 18, generator=torch.Generator().manual_seed(5))
    bases, _ = sketch_direct(w, 3)
    codes, _, history = alternate(w, bases, 30)
    assert all(b <= a + 1e-5 for a, b in itertools.pairwise(history))
    assert history[-1] < history[0]
    # the coefficient step against the normal equations (B^T B) a = B^T w in float64
    b = bases_of_codes(codes, 3)
    bd, wd = b.double(), w.double().unsqueeze(-1)
    ref = torch.linalg.solve(bd.transpose(1, 2) @ bd, bd.transpose(1, 2) @ wd).squeeze(-1)
    assert torch.allclose(least_squares(b, w).double(), ref, atol=1e-5)


def test_straight_through_gradient_and_codebook_export():
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    wq = SketchWeight(short_weight_spec(2))
    out = wq(w)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    exp = wq.export(w)
    assert exp.levels.shape == (4, 1, 4)
    basis = basis_of_levels(exp.levels)  # the levels are exactly those of float16 coefficients
    assert basis is not None and torch.equal(basis_levels(basis), exp.levels)
    rebuilt = torch.gather(exp.levels.reshape(4, 4), 1, exp.codes.reshape(4, -1).long())
    assert torch.equal(rebuilt.reshape(w.shape), out.detach())


def test_config_refuses_bad_bases_and_granularity():
    with pytest.raises(CompactnnError, match=r"1\.\.4"):
        SketchConfig(weight=short_weight_spec(5))
    with pytest.raises(CompactnnError, match="per filter"):
        SketchConfig(weight=compactnn.core.spec.QuantSpec(bits=2, granularity="tensor"))
    with pytest.raises(CompactnnError, match="iters"):
        SketchConfig(iters=0)


def test_artifact_is_bit_exact_and_of_its_packed_size(tmp_path):
    torch.set_num_threads(1)
    model, x = tiny_resnet(), images(16)
    q = compactnn.compress(model, "w2-sketch", calib_data=[x], progress=False)
    sketched = {n: m for n, m in q.named_modules() if is_quant_layer(m) and m.weight_spec.bits == 2}
    assert sketched and all(m.format.endswith("-basis") for m in sketched.values())
    tensors, *_ = pack_model(q)
    for name, m in sketched.items():
        rows, n = m.weight.shape[0], m.weight.numel()
        assert tensors[f"{name}.weight.packed"].numel() == packed_nbytes(n, 2)
        assert tensors[f"{name}.weight.basis"].nbytes == rows * 2 * 2  # m float16 coefficients
        assert f"{name}.weight.levels" not in tensors and f"{name}.weight.scale" not in tensors
    path = tmp_path / "a"
    compactnn.save(q, path)
    loaded = compactnn.load(path, model=tiny_resnet())
    assert torch.equal(q(x), loaded(x))
    raw = (path / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    data = sum(t.nbytes for t in tensors.values())
    assert len(raw) == 8 + header_len + data
    assert set(header) - {"__metadata__"} == set(tensors)
