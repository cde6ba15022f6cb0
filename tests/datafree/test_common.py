import pytest
import torch

from compactnn.datafree import generate
from compactnn.datafree.common import check_classifier
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
