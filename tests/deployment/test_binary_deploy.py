"""Frozen binary blocks on integer kernels: outputs equal the simulated block up to float
rounding of the final scale (a bound derived from alpha), sign(0) = +1, model lowering."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compactnn.deployment.binary import DeployedBinaryBlock, lower_binary_blocks
from compactnn.engines.binary import BinaryBlock, BinaryWeight
from compactnn.errors import CompactnnError
from compactnn.kernels import bitconv

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="session")
def popcount_ok():
    try:
        bitconv.load_extension()
    except CompactnnError as exc:
        pytest.skip(f"bit-packed kernel not built (no working C++ compiler): {exc}")


def frozen_block(kind: str, layer: nn.Module, seed: int = 0) -> BinaryBlock:
    """A trained-looking frozen block: random shift, gain, scale, bias, BN mean, RPReLU."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    b = BinaryBlock(layer, kind, BinaryWeight())
    with torch.no_grad():
        b.shift.copy_(torch.randn(b.shift.shape, generator=g) * 0.1)
        b.gain.copy_(torch.rand(b.gain.shape, generator=g) + 0.5)
        b.scale.copy_(torch.rand(b.scale.shape, generator=g) + 0.5)
        b.layer.bias.copy_(torch.randn(b.layer.bias.shape, generator=g))
        b.norm.running_mean.copy_(torch.randn(b.norm.running_mean.shape, generator=g))
        if b.post is not None:
            b.post.gamma.copy_(torch.randn(b.post.gamma.shape, generator=g) * 0.1)
            b.post.zeta.copy_(torch.randn(b.post.zeta.shape, generator=g) * 0.1)
    return b.eval().freeze().requires_grad_(False)


def rounding_bound(block: BinaryBlock, x: torch.Tensor) -> tuple[float, float]:
    """(tolerance, smallest error of one flipped sign) for a block on input ``x``.

    The integer dot is exact on both paths; the simulation sums ``K`` products ``+-alpha``
    in float32 (error at most ``K * eps * K * alpha``), the deployed one scales once. One
    wrong sign moves an output by at least ``2 * alpha * |g|`` (times XNOR's K).
    """
    layer = block.layer
    k = layer.weight[0].numel()
    alpha = layer.weight_levels.reshape(layer.weight.shape[0], -1)[:, 1]
    g = (block.gain * block.scale).abs()
    kx = (
        (x - block.shift.view(1, -1, *([1] * (x.dim() - 2)))).abs().max()
        if block.kind == "xnor"
        else 1.0
    )
    tol = float(k * k * EPS * (alpha * g).max() * kx) + 8 * EPS * float(block(x).abs().max())
    flip = float(2 * (alpha * g).min()) * (float(kx) if block.kind != "xnor" else 0.0)
    return tol, flip


CASES = [
    (nn.Conv2d, (16, 32, 3, 1, 1), (2, 16, 8, 8)),
    (nn.Conv2d, (70, 70, 3, 2, 1), (2, 70, 9, 9)),  # channel tail, stride 2, shortcut pooled
    (nn.Linear, (40, 20), (3, 40)),
]


@pytest.mark.parametrize("kernel", ["int8", "popcount", "float"])
@pytest.mark.parametrize("kind", ["reactnet", "bireal", "xnor"])
@pytest.mark.parametrize("cls,args,xshape", CASES)
def test_block_matches_simulation(kernel, kind, cls, args, xshape, request):
    if kernel == "popcount":
        request.getfixturevalue("popcount_ok")
    block = frozen_block(kind, cls(*args))
    x = torch.randn(xshape, generator=torch.Generator().manual_seed(1))
    if x.dim() == 4:  # some inputs exactly on the threshold: sign(0) = +1
        x[:, :, 0, :] = block.shift.view(1, -1, 1)
    deployed = DeployedBinaryBlock(block, kernel)
    assert deployed.deploy_leaf is True
    with torch.no_grad():
        ref, got = block(x), deployed(x)
    tol, flip = rounding_bound(block, x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= tol
    if kind != "xnor":
        assert tol < flip  # the bound is tight enough to catch a single wrong sign


@pytest.mark.parametrize("kernel", ["int8", "popcount", "float"])
def test_sign_of_zero_is_plus_one(kernel, request):
    """Input exactly at the shift everywhere: every sign is +1, the dot is the weight sum."""
    if kernel == "popcount":
        request.getfixturevalue("popcount_ok")
    block = frozen_block("bireal", nn.Conv2d(8, 16, 3, 1, 1))
    block.shortcut = False  # isolate the binary path
    x = block.shift.view(1, -1, 1, 1).expand(1, 8, 5, 5).clone()
    deployed = DeployedBinaryBlock(block, kernel)
    layer = block.layer
    w = layer.weight.double()  # +-alpha
    plus = F.conv2d(torch.ones(1, 8, 5, 5, dtype=torch.float64), w, padding=1)
    g = (block.gain * block.scale).double().view(1, -1, 1, 1)
    want = plus * g + layer.bias.double().view(1, -1, 1, 1)
    with torch.no_grad():
        got = deployed(x).double()
    assert float((got - want).abs().max()) < 1e-4


class BinaryNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = frozen_block(kind, nn.Conv2d(16, 16, 3, 1, 1), seed=1)
        self.b2 = frozen_block(kind, nn.Conv2d(16, 32, 3, 2, 1), seed=2)
        self.head = frozen_block(kind, nn.Linear(32, 10), seed=3)

    def forward(self, x):
        y = self.b2(self.b1(self.stem(x)))
        return self.head(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("kernel", ["int8", "popcount", "auto"])
def test_lower_binary_blocks_on_a_model(kernel, request):
    if kernel != "int8":
        request.getfixturevalue("popcount_ok")
    model = BinaryNet("reactnet").eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    fast = lower_binary_blocks(model, kernel, example=x, threads=1)
    assert all(isinstance(getattr(model, n), BinaryBlock) for n in ("b1", "b2", "head"))
    assert all(isinstance(getattr(fast, n), DeployedBinaryBlock) for n in ("b1", "b2", "head"))
    assert set(fast.binary_kernels) == {"b1", "b2", "head"}
    chosen = {s["kernel"] for s in fast.binary_kernels.values()}
    assert chosen <= ({"int8", "popcount", "float"} if kernel == "auto" else {kernel})
    if kernel == "auto":  # every kernel timed, with its elementwise tail
        keys = ("int8_ms", "popcount_ms", "float_ms")
        assert all(all(k in s for k in keys) for s in fast.binary_kernels.values())
    with torch.no_grad():
        ref, got = model(x), fast(x)
    assert float((ref - got).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_deploy_runs_a_binary_model_end_to_end(popcount_ok):
    """compactnn.deploy lowers the blocks (int8 or popcount, per block), traces the rest,
    verifies the whole model and refuses ONNX Runtime."""
    import warnings

    import compactnn

    model = BinaryNet("reactnet").eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = compactnn.deploy(model, "onednn", example=x)
        with pytest.raises(CompactnnError, match="binary blocks"):
            compactnn.deploy(model, "onnxruntime", example=x)
    assert fast.verification.passed and fast.kept_float == {}
    assert set(fast.binary_kernels) == {"b1", "b2", "head"}
    with torch.no_grad():
        ref, got = model(x), fast(x)
    assert float((ref - got).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert isinstance(model.b1, BinaryBlock)  # the user's model is untouched


def test_user_mistakes_are_named():
    layer = nn.Conv2d(4, 4, 3, padding=1)
    training = BinaryBlock(layer, "reactnet", BinaryWeight())
    with pytest.raises(CompactnnError, match="freeze"):
        DeployedBinaryBlock(training, "int8")
    with pytest.raises(CompactnnError, match="kernel='fast'"):
        lower_binary_blocks(nn.Sequential(), "fast")
    block = frozen_block("reactnet", nn.Conv2d(4, 4, 3, padding=1))
    model = nn.Sequential(block, nn.Identity())
    skipping = nn.Module()
    skipping.unused = block  # never called by forward: no input to verify it on
    skipping.forward = lambda x: x
    with pytest.raises(CompactnnError, match="not reached"):
        lower_binary_blocks(skipping, "int8", example=torch.randn(1, 4, 5, 5))
    assert lower_binary_blocks(model, "int8").binary_kernels == {"0": {"kernel": "int8"}}


class SequentialBinaryNet(nn.Module):
    """Blocks followed by (identity, ReLU) inside Sequentials, as the reference CNNs have."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.features = nn.Sequential(
            nn.Sequential(frozen_block("reactnet", nn.Conv2d(16, 32, 3, 2, 1), 1), nn.Identity(),
                          nn.ReLU(inplace=True)),
            nn.Sequential(frozen_block("reactnet", nn.Conv2d(32, 32, 3, 1, 1), 2), nn.ReLU()),
            nn.Sequential(frozen_block("bireal", nn.Conv2d(32, 32, 3, 1, 1), 3), nn.Tanh()),
        )  # fmt: skip

    def forward(self, x):
        return self.features(self.stem(x))


@pytest.mark.parametrize("kernel", ["int8", "popcount", "float"])
def test_following_relu_is_fused_into_the_block(kernel, request):
    """A ReLU right after a block joins the block's tail (shortcut + RPReLU + ReLU, one pass
    where the extension loads); a non-ReLU successor stays; outputs match the model."""
    if kernel == "popcount":
        request.getfixturevalue("popcount_ok")
    model = SequentialBinaryNet().eval()
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    fast = lower_binary_blocks(model, kernel, example=x)
    f = fast.features
    assert f[0][0].relu and f[1][0].relu and not f[2][0].relu
    assert isinstance(f[0][2], nn.Identity) and isinstance(f[1][1], nn.Identity)
    assert isinstance(f[2][1], nn.Tanh)
    assert isinstance(model.features[0][2], nn.ReLU)  # the user's model is untouched
    with torch.no_grad():
        ref, got = model(x), fast(x)
        inner = fast.features[0][0](fast.stem(x))
    assert float(inner.min()) >= 0.0
    assert float((ref - got).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_fused_tail_is_bit_identical_to_the_pytorch_ops(popcount_ok):
    """The extension's one-pass tail (shortcut with channel repeat, RPReLU, ReLU) and sign
    codes equal the PyTorch ops they replace bit for bit, NaN and sign(0) included."""
    from compactnn.engines.binary import real_shortcut, rprelu

    ext = bitconv.load_extension()
    g = torch.Generator().manual_seed(11)
    y = torch.randn(2, 32, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 10, 10, generator=g).contiguous(memory_format=torch.channels_last)
    y[0, 3, 1, 1] = float("nan")
    gamma, zeta, slope = (torch.randn(32, generator=g) * 0.3 for _ in range(3))
    want = rprelu(y + real_shortcut(x, y, True), gamma, zeta, slope, dim=1).relu()
    sc = F.adaptive_avg_pool2d(x, (5, 5))
    got = y.clone(memory_format=torch.channels_last)
    ext.binary_tail(got.permute(0, 2, 3, 1), sc, 2, gamma, slope, zeta, True, 1)
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)) and got[0, 3, 1, 1].isnan()
    shift = torch.randn(16, generator=g)
    x[:, :, 0, 0] = shift.view(1, -1)  # exactly on the threshold: +1
    x[1, 2, 3, 3] = float("nan")  # NaN compares false: -1
    codes = ext.sign_codes(x, shift)
    ref = torch.where(x - shift.view(1, -1, 1, 1) >= 0, 129, 127).to(torch.uint8)
    assert codes.is_contiguous(memory_format=torch.channels_last) and torch.equal(codes, ref)


@pytest.mark.parametrize(
    ("cin", "cout", "channels_last"), [(16, 32, True), (32, 32, True), (8, 24, False), (6, 6, True)]
)
def test_fused_tail_pools_a_stride_2_shortcut_bit_for_bit(popcount_ok, cin, cout, channels_last):
    """pool=2: the tail reads the unpooled shortcut and averages each 2x2 window itself, equal
    to ``avg_pool2d(x, 2, 2)`` then the tail (vector path: O % 16 == 0 and channels-last x;
    the scalar path otherwise)."""
    from compactnn.engines.binary import rprelu

    ext = bitconv.load_extension()
    g = torch.Generator().manual_seed(cin + cout)
    y = torch.randn(3, cout, 4, 6, generator=g).contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, cin, 8, 12, generator=g) * 3
    x[0, 0, :2, :2] = -0.0  # the sign of a zero average follows avg_pool2d's 0 + ...
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma, zeta, slope = (torch.randn(cout, generator=g) * 0.3 for _ in range(3))
    pooled = F.avg_pool2d(x, 2, 2).repeat_interleave(cout // cin, dim=1)
    want = rprelu(y + pooled, gamma, zeta, slope, dim=1).relu()
    got = y.clone(memory_format=torch.channels_last)
    ext.binary_tail(got.permute(0, 2, 3, 1), x, cout // cin, gamma, slope, zeta, True, 2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kernel", ["int8", "float"])
@pytest.mark.parametrize("kind", ["reactnet", "xnor"])
@pytest.mark.parametrize("groups", [4, 16])
def test_grouped_and_depthwise_blocks_run_on_integer_kernels(kernel, kind, groups):
    """A block on a grouped / depthwise convolution (ConvNeXt's 7x7 depthwise) deploys on
    the int8 and float kernels instead of refusing the whole model."""
    block = frozen_block(kind, nn.Conv2d(16, 16, 3, 1, 1, groups=groups))
    x = torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(3))
    deployed = DeployedBinaryBlock(block, kernel)
    with torch.no_grad():
        ref, got = block(x), deployed(x)
    tol, _ = rounding_bound(block, x)
    assert float((got - ref).abs().max()) <= tol


def test_grouped_block_skips_popcount_in_auto():
    model = nn.Sequential(frozen_block("reactnet", nn.Conv2d(16, 16, 3, 1, 1, groups=16)))
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(4))
    fast = lower_binary_blocks(model, "auto", example=x, threads=1)
    assert "popcount_ms" not in fast.binary_kernels["0"]
    assert fast.binary_kernels["0"]["kernel"] in ("int8", "float")
    with pytest.raises(CompactnnError, match=r"groups=16.*kernel='int8'"):
        DeployedBinaryBlock(model[0], "popcount")
