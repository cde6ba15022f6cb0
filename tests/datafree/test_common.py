import pytest
import torch

from compactnn.datafree import generate
from compactnn.datafree.common import check_classifier, check_input_shape
from compactnn.errors import CompactnnError
from tests.datafree.conftest import TinyCNN


def test_an_input_shape_the_model_cannot_take_names_it_and_the_expected_channels():
    m = TinyCNN().eval()
    assert check_classifier(m, torch.randn(2, 1, 8, 8)) == 3
    with pytest.raises(CompactnnError, match=r"input_shape=\(2, 8, 8\) does not fit.*C=1"):
        check_classifier(m, torch.randn(2, 2, 8, 8))
    with pytest.raises(CompactnnError, match=r"input_shape=\(3, 8, 8\) does not fit.*C=1"):
        generate(m, 4, input_shape=(3, 8, 8))


def test_bn_inversion_without_batch_norm_names_the_dafl_call():
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with pytest.raises(CompactnnError, match=r"generate\(model, n, method='dafl'\)"):
        generate(m, 4, input_shape=(1, 8, 8), progress=False)


@pytest.mark.parametrize(
    ("given", "shape"),
    [
        ((1, 8, 8), (1, 8, 8)),
        ("1,8,8", (1, 8, 8)),
        (" 3, 4 ,5", (3, 4, 5)),
        ([2.0, 4, 4], (2, 4, 4)),
        (torch.Size([1, 8, 8]), (1, 8, 8)),
    ],
)
def test_check_input_shape_reads_sequences_and_c_h_w_strings(given, shape):
    assert check_input_shape(given) == shape


@pytest.mark.parametrize("given", ["1,8", "1,a,8", "1,8.5,8", (1, 0, 8), None, "1x8x8"])
def test_check_input_shape_refuses_with_the_fix(given):
    with pytest.raises(CompactnnError, match=r"input_shape=.*\(1, 28, 28\) or '1,28,28'"):
        check_input_shape(given)


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x, extra):
        return self.net(x) + extra


def test_a_two_input_model_is_told_single_input_models_only():
    m = TwoInputs().eval()
    with pytest.raises(CompactnnError, match=r"TwoInputs takes more than one input.*'extra'"):
        check_classifier(m, torch.randn(2, 1, 8, 8))
    with pytest.raises(CompactnnError, match="supports single-input models only"):
        generate(m, 4, input_shape=(1, 8, 8), progress=False)
    with pytest.raises(CompactnnError, match="supports single-input models only"):
        generate(m, 4, input_shape=(1, 8, 8), method="dafl", steps=1, progress=False)
