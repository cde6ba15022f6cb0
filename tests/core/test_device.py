"""Device names: parsed, and refused with the fix when this machine lacks the device."""

import pytest
import torch

from compactnn.core.device import check_device
from compactnn.errors import CompactnnError


def test_cpu_is_accepted_and_bad_names_are_named():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(CompactnnError, match="'gpu0' is not a device name"):
        check_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_use_cpu():
    with pytest.raises(CompactnnError, match="sees no CUDA GPU here: use 'cpu'"):
        check_device("cuda:0")
