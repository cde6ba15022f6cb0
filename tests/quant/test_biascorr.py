import torch
from _ptq_models import images, tiny_resnet
from torch import nn

import compactnn


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
    ).eval()


def channel_means(y: torch.Tensor) -> torch.Tensor:
    return y.double().mean(dim=(0, 2, 3))  # (C,)


def test_bias_correction_removes_the_mean_output_shift():
    m = conv_net()
    x = images(128) + 0.5  # inputs with a non-zero mean make the shift visible
    rtn = compactnn.compress(m, "w2a8", calib_data=x, progress=False)
    bc = compactnn.compress(m, "w2a8-biascorr", calib_data=x, progress=False)
    with torch.no_grad():
        want = channel_means(m(x))
        shift_rtn = (channel_means(rtn(x)) - want).abs().max()
        shift_bc = (channel_means(bc(x)) - want).abs().max()
    # w2a8 keeps the first and last layers at 8 bits; the 2-bit middle layer's shift
    # propagates to the output, and the correction removes it.
    assert shift_rtn > 1e-2
    assert shift_bc < 1e-4


def test_each_corrected_layer_matches_the_float_channel_mean():
    m = conv_net()
    x = images(64) + 0.5
    bc = compactnn.compress(m, "w2a2-biascorr", calib_data=x, progress=False)
    with torch.no_grad():
        want = channel_means(m[:3](x))
        have = channel_means(bc[:3](x))
    assert torch.allclose(have, want, atol=1e-4)


def test_layer_without_bias_gains_one_and_saves_exactly(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(64, 16) + 0.3
    q = compactnn.compress(m, "w3a8-biascorr", calib_data=x, progress=False)
    assert q[0].bias is not None and q[0].bias.abs().max() > 0
    compactnn.save(q, tmp_path / "a")
    skeleton = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8))
    q2 = compactnn.load(tmp_path / "a", model=skeleton)
    assert torch.equal(q2(x), q(x))


def test_saved_artifact_gives_identical_outputs(tmp_path):
    x = images(64)
    q = compactnn.compress(tiny_resnet(), "w4a4-biascorr", calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "a")
    q2 = compactnn.load(tmp_path / "a", model=tiny_resnet())
    assert torch.equal(q2(x), q(x))
