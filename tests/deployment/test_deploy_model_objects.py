"""deploy takes the model inside torch.compile / DataParallel, and warns about hooks it drops."""

import warnings

import pytest
import torch
from torch import nn

import compactnn


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()


@pytest.fixture(scope="module")
def qnet():
    x = torch.randn(16, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compactnn.compress(_net(), "w8a8", calib_data=x, progress=False), x


def test_deploying_a_data_parallel_wrapper_deploys_the_model_inside(qnet):
    q, x = qnet
    with pytest.warns(UserWarning, match=r"model inside nn.DataParallel \(model.module\)"):
        fast = compactnn.deploy(nn.DataParallel(q), "onednn", example=x[:4])
    plain = compactnn.deploy(q, "onednn", example=x[:4])
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)


def test_hooks_the_deployed_program_drops_are_named(qnet):
    q, x = qnet
    import copy

    q2 = copy.deepcopy(q)
    seen = []
    q2[3].register_forward_hook(lambda m, i, o: seen.append(o.shape))  # observes only
    with pytest.warns(UserWarning, match=r"the hooks on 3 do not run in the deployed program"):
        fast = compactnn.deploy(q2, "onednn", example=x[:4])
    calls = len(seen)
    fast(x)
    assert len(seen) == calls  # the deployed program runs no hook
