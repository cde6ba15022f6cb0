import pytest
import torch
from torch import nn

import compactnn
from compactnn.datafree import GeneratedData, generate, invert_bn
from compactnn.datafree.bn_inversion import (
    BNStats,
    bn_statistics_loss,
    negative_entropy,
    total_variation,
)
from compactnn.errors import CompactnnError
from compactnn.training.data import as_train_data


def test_bn_statistics_loss_by_hand():
    means = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    stds = [torch.tensor([1.0, 1.0]), torch.tensor([3.0])]
    rm = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    rs = [torch.tensor([4.0, 5.0]), torch.tensor([1.0])]
    # layer 1: ||(0, 2)|| + ||(-3, -4)|| = 2 + 5; layer 2: 0 + 2
    assert float(bn_statistics_loss(means, stds, rm, rs)) == pytest.approx(9.0)


def test_total_variation_and_entropy_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # vertical diffs 2, 3 -> mean of squares 6.5; horizontal 1, 2 -> 2.5
    assert float(total_variation(x)) == pytest.approx(9.0)
    logits = torch.log(torch.tensor([[0.25, 0.75], [0.75, 0.25]]))  # mean p = (1/2, 1/2)
    assert float(negative_entropy(logits)) == pytest.approx(-torch.log(torch.tensor(2.0)).item())


def test_bn_hooks_record_the_batch_statistics(tiny_teacher):
    stats = BNStats(tiny_teacher)
    x = torch.randn(5, 1, 8, 8)
    tiny_teacher(x)
    pre = tiny_teacher.features[0](x)  # the first BN's input
    assert torch.allclose(stats.means[0], pre.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(stats.stds[0], pre.var((0, 2, 3), unbiased=False).sqrt(), atol=1e-4)
    stats.remove()


def test_inversion_matches_the_running_statistics(tiny_teacher):
    before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    stats = BNStats(tiny_teacher)
    with torch.no_grad():
        tiny_teacher(torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    start = float(stats.loss())
    stats.remove()
    data = invert_bn(
        tiny_teacher,
        32,
        input_shape=(1, 8, 8),
        steps=40,
        batch_size=32,
        class_weight=0.0,
        lr=0.05,
        progress=False,
    )
    stats = BNStats(tiny_teacher)
    with torch.no_grad():
        tiny_teacher(data.x)
    assert float(stats.loss()) < 0.3 * start
    assert all(torch.equal(v, tiny_teacher.state_dict()[k]) for k, v in before.items())
    assert data.x.shape == (32, 1, 8, 8) and data.y.shape == (32,)
    assert data.cost["method"] == "bn-inversion" and data.cost["seconds"] >= 0
    assert data.cost["peak_rss_mib"] > 0


def test_generated_data_plugs_into_compress_and_train(tiny_teacher):
    data = generate(tiny_teacher, 16, input_shape=(1, 8, 8), steps=2, progress=False)
    assert isinstance(data, GeneratedData) and len(data) == 1
    q = compactnn.compress(tiny_teacher, "w8a8", calib_data=data, progress=False)
    # inputs like the teacher's training data (the fixture's), from their own seed: compress
    # keeps the caller's RNG now (it reseeded it with 0, which this check used to draw from)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = 0.5 + 0.3 * noise.cumsum(3) / 3
    y = tiny_teacher(x)
    assert (q(x) - y).abs().max() < 0.05 * y.abs().max()  # measured: 1.3% of the output range
    td = as_train_data(data)
    assert torch.equal(td.x, data.x) and torch.equal(td.y, data.y)


def test_clear_errors(tiny_teacher):
    no_bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(CompactnnError, match="no BatchNorm"):
        generate(no_bn, 4, input_shape=(1, 8, 8), progress=False)
    with pytest.raises(CompactnnError, match="input_shape"):
        generate(tiny_teacher, 4, progress=False)
    not_classifier = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(CompactnnError, match="classes"):
        generate(not_classifier, 4, input_shape=(1, 8, 8), progress=False)
    with pytest.raises(CompactnnError, match="unknown"):
        generate(tiny_teacher, 4, input_shape=(1, 8, 8), method="gan")
