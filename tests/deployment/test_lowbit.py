"""Low-bit activations and codebook weights on the int8 kernels, checked against the
simulation: verification, the uint8 codes each kernel writes, and the weight terms."""

import copy
import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qlayers import ActQuantizer, is_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.deployment.lowbit import (
    ClampU8,
    QuantizeGrid,
    SplitConv2d,
    SplitLinear,
    clamped_unary,
)
from compactnn.lowering.graph import act_form
from tests.deployment.conftest import make_net

CALIB_SEED = 1


def _calib() -> torch.Tensor:
    torch.manual_seed(CALIB_SEED)
    return torch.randn(32, 3, 16, 16)


def _deploy(qmodel: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer may be kept in float (that warns)
        return compactnn.deploy(qmodel, backend="onednn", example=x)


def _sim_codes(qmodel: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each quantized layer's input codes in the simulation, as uint8 (signed + 128)."""
    codes = {}

    def hook(name, aq):
        def fn(module, args):
            s, z = aq.scale, aq.zero
            q = torch.clamp(torch.round(args[0] / s) + z, aq.qtype.qmin, aq.qtype.qmax)
            codes[name] = q + (128 if aq.qtype.signed else 0)

        return fn

    handles = [
        m.register_forward_pre_hook(hook(n, m.input_quantizer))
        for n, m in qmodel.named_modules()
        if is_quant_layer(m)
    ]
    with torch.no_grad():
        qmodel(x)
    for h in handles:
        h.remove()
    return codes


@pytest.mark.parametrize("recipe", ["w4a4", "w2a4", "w4a8"])
def test_low_bit_recipes_deploy_with_simulated_codes(recipe):
    calib = _calib()
    q = compactnn.compress(make_net(), recipe, calib_data=calib, progress=False)
    deployed = _deploy(q, calib[:8])
    assert deployed.kept_float == {}
    assert deployed.verification.max_diff_steps < 0.01
    # every uint8 value a kernel writes for a 4-bit consumer lies on that 4-bit grid and
    # equals the simulation's codes of that consumer's input
    sim = _sim_codes(q, calib[:8])
    program = deployed.program
    written = {}
    for name, m in program.named_modules():
        out = getattr(m, "out", None)
        if isinstance(out, tuple):
            m.register_forward_hook(lambda mod, a, y, n=name: written.__setitem__(n, y.clone()))
    program(calib[:8])  # the graph itself: the runner calls kernels without module hooks
    narrow = {n: y for n, y in written.items() if len(program.get_submodule(n).out) == 4}
    if recipe != "w4a8":
        assert narrow, "low-bit activations must be written by the kernels as narrow codes"
    for n, y in narrow.items():
        lo, hi = program.get_submodule(n).out[2:]
        assert lo <= int(y.min()) and int(y.max()) <= hi
    # the depthwise kernel writes pw's input codes (ReLU6 and the grid's clamp in one post-op)
    dw = next(y for n, y in written.items() if n.endswith("dw_0"))
    ref = sim["pw.0"]
    assert dw.dtype == torch.uint8 and dw.shape == ref.shape
    assert (dw.float() != ref).float().mean() < 1e-3
    assert (dw.float() - ref).abs().max() <= 1


def test_signed_low_bit_grid_shifts_by_128_and_clamps():
    aq = ActQuantizer(QuantSpec(bits=4, symmetric=True, granularity="tensor", signed=True))
    aq.set_qparams(torch.tensor(0.25), torch.tensor(0.0))
    form = act_form(aq)
    assert form == (0.25, 128, 120, 135)
    x = torch.linspace(-5, 5, 101)
    expected = torch.clamp(torch.round(x / 0.25), -8, 7) + 128
    assert torch.equal(QuantizeGrid(form)(x).float(), expected)
    assert torch.equal(ClampU8(120, 135)(torch.arange(256, dtype=torch.uint8)).unique(),
                       torch.arange(120, 136, dtype=torch.uint8))  # fmt: skip


def test_clamped_unary_bounds_are_the_grids_float_ends():
    form = (0.5, 3, 0, 15)
    assert clamped_unary(None, form) == (("hardtanh", [-1.5, 6.0]), False)
    assert clamped_unary(("relu", []), form) == (("hardtanh", [0.0, 6.0]), False)
    assert clamped_unary(("hardtanh", [0.0, 4.0]), form) == (("hardtanh", [0.0, 4.0]), False)
    assert clamped_unary(("hardtanh", [7.0, 9.0]), form) == (("hardtanh", [7.0, 9.0]), True)
    assert clamped_unary(("relu", []), (0.5, 3)) == (("relu", []), False)


class _Pass(nn.Module):
    def forward(self, x):
        return x


class _Residual(nn.Module):
    """conv -> (grid) -> conv + add -> conv: the add reads the block input's codes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.rq, self.conv3, self.fc = _Pass(), nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        h = self.rq(torch.relu(self.conv1(x)))
        h = torch.relu(h + self.conv2(h))
        return self.fc(torch.relu(self.conv3(h)).mean((2, 3)))


def test_low_bit_residual_sum_stays_uint8_and_exact():
    torch.manual_seed(0)
    calib = _calib()
    q = compactnn.compress(_Residual().eval(), "w4a4", calib_data=calib, progress=False)
    q.rq = copy.deepcopy(q.conv2.input_quantizer)  # the add reads conv2's 4-bit codes
    assert q.rq.qtype.bits == 4
    deployed = _deploy(q, calib[:8])
    assert deployed.verification.max_diff_steps < 0.01
    sums = [m for m in deployed.program.modules() if getattr(m, "accum", None) is not None]
    assert len(sums) == 1 and sums[0].accum != "float" and len(sums[0].out) == 4
    assert any(isinstance(m, ClampU8) for m in deployed.program.modules())


@pytest.mark.parametrize("recipe", ["w2a8-ttq", "w2a4-twn", "w4a4-dorefa", "w5a8-inq"])
def test_codebook_recipes_deploy_exactly(recipe):
    calib = _calib()
    q = compactnn.compress(make_net(), recipe, calib_data=calib, progress=False)
    assert any(getattr(m, "weight_levels", None) is not None for m in q.modules()) or (
        recipe == "w2a4-twn"
    )
    deployed = _deploy(q, calib[:8])
    assert deployed.kept_float == {}
    assert deployed.verification.max_diff_steps < 0.01


def test_split_conv_sums_two_terms_like_a_float_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    aq = ActQuantizer(QuantSpec(bits=4, symmetric=False, granularity="tensor", signed=False))
    aq.set_qparams(torch.tensor(0.125), torch.tensor(2.0))
    conv.input_quantizer = aq
    t1 = (torch.randint(-128, 128, (6, 4, 3, 3)).to(torch.int8), torch.rand(6) + 0.1)
    t2 = (torch.randint(-128, 128, (6, 4, 3, 3)).to(torch.int8), torch.rand(6) * 1e-3)
    split = SplitConv2d(conv, [t1, t2], None, ("relu", []))
    x = torch.randint(0, 16, (2, 4, 5, 5)).to(torch.uint8)
    w = t1[0].double() * t1[1].double()[:, None, None, None]
    w = w + t2[0].double() * t2[1].double()[:, None, None, None]
    xf = (x.double() - 2) * 0.125
    ref = torch.relu(nn.functional.conv2d(xf, w, conv.bias.double(), padding=1))
    y = split(x.contiguous(memory_format=torch.channels_last))
    assert (y.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def _split_layer(cls):
    """A layer with a 4-bit input grid (scale 0.125, zero 2) and two random int8 terms."""
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1) if cls is SplitConv2d else nn.Linear(12, 6)
    aq = ActQuantizer(QuantSpec(bits=4, symmetric=False, granularity="tensor", signed=False))
    aq.set_qparams(torch.tensor(0.125), torch.tensor(2.0))
    layer.input_quantizer = aq
    shape = (6, 4, 3, 3) if cls is SplitConv2d else (6, 12)
    t1 = (torch.randint(-128, 128, shape).to(torch.int8), (torch.rand(6) + 0.1) * 4e-3)
    t2 = (torch.randint(-128, 128, shape).to(torch.int8), torch.rand(6) * 2e-4)
    with torch.no_grad():
        layer.bias.mul_(0.1)
    return layer, [t1, t2]


def _split_reference(layer, terms, x):
    """The float64 layer on the dequantized input and the summed weight terms."""
    view = (-1,) + (1,) * (terms[0][0].dim() - 1)
    w = sum(c.double() * s.double().reshape(view) for c, s in terms)
    xf = (x.double() - 2) * 0.125
    if isinstance(layer, nn.Conv2d):
        return nn.functional.conv2d(xf, w, layer.bias.double(), padding=1)
    return nn.functional.linear(xf, w, layer.bias.double())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cls", [SplitConv2d, SplitLinear])
@pytest.mark.parametrize(
    "form,unary",
    [
        ((0.05, 0), ("relu", [])),  # uint8 grid, ReLU folded into the codes' clamp
        ((0.03, 7, 0, 15), ("hardtanh", [0.0, 0.2])),  # narrow 4-bit grid and a ReLU6-like
        ((0.04, 128), None),  # signed grid, no post-op
    ],
)
def test_stacked_terms_are_one_kernel_with_the_simulated_codes(
    cls, form, unary, fused, monkeypatch
):
    """Two terms stacked as 2 * out channels of ONE int8 kernel; the combine adds the halves,
    applies the post-op and quantizes (one pass of the compiled extension, or PyTorch ops
    without it): the codes equal quantizing the float64 reference (up to a rounding tie,
    never seen here)."""
    from compactnn.deployment.onednn import Int8Conv2d, Int8Linear
    from compactnn.kernels import bitconv

    if fused and not bitconv.available():
        pytest.skip("the compiled extension is not available")
    if not fused:
        monkeypatch.setattr(bitconv, "loaded", lambda: None)

    layer, terms = _split_layer(cls)
    split = cls(layer, terms, form, unary)
    kernels = [m for m in split.modules() if isinstance(m, (Int8Conv2d, Int8Linear))]
    assert len(kernels) == 1 and kernels[0].w_int8.shape[0] == 12  # 2 x 6 output channels
    shape = (3, 4, 5, 5) if cls is SplitConv2d else (3, 12)
    x = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = _split_reference(layer, terms, x)
    if unary is not None:
        lo_f, hi_f = (0.0, float("inf")) if unary[0] == "relu" else unary[1]
        ref = ref.clamp(lo_f, hi_f)
    lo, hi = (form[2], form[3]) if len(form) == 4 else (0, 255)
    want = torch.clamp(torch.round(ref / form[0]) + form[1], lo, hi).to(torch.uint8)
    got = split(x)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want)
    assert len(set(want.unique().tolist())) > 3  # not all clamped: the test can fail


def test_stacked_linear_float_output_matches_float64():
    layer, terms = _split_layer(SplitLinear)
    split = SplitLinear(layer, terms, None, ("relu", []))
    x = torch.randint(0, 16, (3, 12), generator=torch.Generator().manual_seed(4)).to(torch.uint8)
    ref = torch.relu(_split_reference(layer, terms, x))
    y = split(x)
    assert y.dtype == torch.float32
    assert (y.double() - ref).abs().max() < 1e-5 * ref.abs().max()
