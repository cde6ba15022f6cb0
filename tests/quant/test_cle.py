import pytest
import torch
from _ptq_models import images, tiny_resnet
from torch import nn

import compactnn
from compactnn.core.fold import fold_batchnorm
from compactnn.quant.cle import CLEConfig, equalize_pair, find_pairs
from compactnn.recipe import Recipe, Step, parse_short_name


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.LeakyReLU(0.1),
        nn.Conv2d(8, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    with torch.no_grad():  # unbalanced channel ranges, as trained nets have
        m[0].weight.mul_(torch.logspace(-1, 1, 8).reshape(-1, 1, 1, 1))
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def cle_recipe(then: str | None = None) -> Recipe:
    steps = (Step("cle", CLEConfig()),)
    if then:
        steps += parse_short_name(then).steps
    return Recipe("cle", steps)


def test_pairs_follow_homogeneous_ops_only():
    m = cnn()
    assert find_pairs(m) == [("4", "6"), ("6", "10")]  # the batch norm blocks conv 0
    fold_batchnorm(m)
    assert find_pairs(m) == [("0", "4"), ("4", "6"), ("6", "10")]
    # the residual block's input feeds two consumers, so only conv1 -> conv2 pairs up
    assert ("block.conv1", "block.conv2") in find_pairs(tiny_resnet())
    assert all(a != "stem" for a, _ in find_pairs(tiny_resnet()))


@pytest.mark.parametrize("model", [cnn, tiny_resnet])
def test_equalization_leaves_float_outputs_unchanged(model):
    m = model()
    x = images(32)
    eq = compactnn.compress(m, cle_recipe(), progress=False)
    with torch.no_grad():
        assert torch.allclose(eq(x), m(x), rtol=1e-4, atol=1e-5)
    assert any("equalized" in n for n in compactnn.info_of(eq)["notes"])


def test_pair_ranges_become_equal():
    torch.manual_seed(0)
    a, b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)
    with torch.no_grad():
        a.weight.mul_(torch.logspace(-2, 2, 8).reshape(-1, 1, 1, 1))
    equalize_pair(a, b)
    r_a = a.weight.abs().amax(dim=(1, 2, 3))
    r_b = b.weight.abs().amax(dim=(0, 2, 3))
    assert torch.allclose(r_a, r_b, rtol=1e-5)


def test_equalization_helps_per_tensor_weights():
    m = cnn()
    x = images(128)
    spec = parse_short_name("w4a8").steps[0].config
    per_tensor = type(spec)(
        weight=spec.weight.__class__(bits=4, granularity="tensor"), act=spec.act
    )
    plain = Recipe("pt", (Step("rtn", per_tensor),))
    with_cle = Recipe("cle-pt", (Step("cle", CLEConfig()), Step("rtn", per_tensor)))
    q_plain = compactnn.compress(m, plain, calib_data=x, progress=False)
    q_cle = compactnn.compress(m, with_cle, calib_data=x, progress=False)
    with torch.no_grad():
        err_plain = (q_plain(x) - m(x)).pow(2).mean()
        err_cle = (q_cle(x) - m(x)).pow(2).mean()
    assert err_cle < 0.5 * err_plain


def test_untraceable_model_is_left_unchanged_with_a_note():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.b(torch.relu(self.a(x)))

    m = Dynamic().eval()
    eq = compactnn.compress(m, cle_recipe(), progress=False)
    assert torch.equal(eq.a.weight, m.a.weight)
    assert "does not trace" in " ".join(compactnn.info_of(eq)["notes"])


def test_cle_then_quantize_saves_exactly(tmp_path):
    x = images(64)
    q = compactnn.compress(cnn(), cle_recipe("w4a8-biascorr"), calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "a")
    q2 = compactnn.load(tmp_path / "a", model=cnn())
    assert torch.equal(q2(x), q(x))
