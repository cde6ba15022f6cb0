"""compress on the model objects users hand it: a torch.compile / nn.DataParallel wrapper,
a model with the legacy torch.nn.utils.weight_norm, layers sharing one weight (tied)."""

import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import compactnn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.bn.running_mean.uniform_(-0.2, 0.2)
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


X = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(1))


def _compress(model: nn.Module, recipe: str = "w8a8") -> nn.Module:
    return compactnn.compress(model, recipe, calib_data=X, progress=False)


@pytest.mark.parametrize(
    ("wrap", "where"),
    [
        (torch.compile, r"torch.compile's wrapper \(model._orig_mod\).*compile it again"),
        (nn.DataParallel, r"nn.DataParallel \(model.module\).*wrap it again"),
    ],
)
def test_a_wrapped_model_compresses_as_the_model_inside(tmp_path, wrap, where):
    """The wrapper was compressed as the model: its batch norm was not folded (outputs 2e-3
    from the plain model's), its class was recorded (the artifact loaded onto it only), and
    deploy failed inside it, all without a word."""
    plain = _compress(Net().eval())
    with pytest.warns(UserWarning, match=rf"^compressing the model inside {where} if you want"):
        wrapped = _compress(wrap(Net().eval()))
    assert type(wrapped) is Net
    assert compactnn.info_of(wrapped)["folded_bn"] == ["bn"]
    with torch.no_grad():
        assert torch.equal(wrapped(X), plain(X))
    compactnn.save(plain, tmp_path / "plain")
    compactnn.save(wrapped, tmp_path / "wrapped")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("plain", "wrapped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = compactnn.load(tmp_path / "wrapped", model=Net())
    with torch.no_grad():
        assert torch.equal(loaded(X), plain(X))


def test_legacy_weight_norm_without_a_forward_compresses():
    """deepcopy raised 'Only Tensors created explicitly by the user (graph leaves) support
    the deepcopy protocol'; the result is the model with its weight norm removed, compressed."""
    model = Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(model.fc)
    plain = Net().eval()
    plain.fc.weight.data = model.fc.weight.detach().clone()  # g * v / |v|: not bit-equal
    q = _compress(model)
    assert "weight_g" in dict(model.fc.named_parameters())  # the input is left as it was
    with torch.no_grad():
        assert torch.equal(q(X), _compress(plain)(X))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight  # a is the first layer: 8-bit by the first/last rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_layers_quantized_apart_are_warned():
    """Quantized separately (and in different formats) without a word before."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning) as caught:
        q = compactnn.compress(Tied(), "w4-g8", calib_data=x, progress=False)
    tied = [str(w.message) for w in caught if str(w.message).startswith("tied weights")]
    assert tied == [
        "tied weights: a and b (a: int8-sym-group8, b: uint4-asym-group8; formats differ) "
        "share one weight Parameter in the float model; compress quantizes each layer on its "
        "own, so the result holds (and save stores) a separate quantized copy per layer, no "
        "longer tied. Where formats differ their values differ too; to give tied layers one "
        "format, set first_last_bits: null in the step's config when the first/last-layer "
        "rule sets one apart."
    ]
    assert tied[0] in compactnn.info_of(q)["notes"]
