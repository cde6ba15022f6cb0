"""A batch norm in training mode that sees one value per channel per sample: a last batch
of one sample is dropped, a batch size (or data) of one is refused before training."""

import dataclasses
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compactnn
from compactnn.errors import CompactnnError
from compactnn.training.batch_norm import single_value_norm
from compactnn.training.data import TrainData


class TinyBN1d(nn.Module):
    """conv -> linear -> BatchNorm1d -> linear: the batch norm stays (not folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.f1 = nn.Linear(4 * 4 * 4, 16)
        self.bn = nn.BatchNorm1d(16)
        self.f2 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x)).flatten(1)
        return self.f2(torch.relu(self.bn(self.f1(x))))


def recipe(batch_size: int) -> compactnn.Recipe:
    step = compactnn.resolve_recipe("w4a8-lsq").steps[0]
    config = dataclasses.replace(step.config, batch_size=batch_size)
    return compactnn.Recipe(f"lsq-bs{batch_size}", (dataclasses.replace(step, config=config),))


@pytest.fixture(scope="module")
def bn_model():
    torch.manual_seed(0)
    model = TinyBN1d().eval()
    x = torch.randn(9, 1, 8, 8)
    y = torch.randint(0, 4, (9,))
    return model, x, y


KW = dict(seed=0, progress=False)


def test_a_last_batch_of_one_sample_is_dropped_with_a_warning(bn_model):
    model, x, y = bn_model
    with pytest.warns(UserWarning, match=r"batch_size=8 leaves 1 of the 9 .* dropped"):
        q = compactnn.train(model, recipe(8), (x, y), epochs=3, **KW)
    history = q._compactnn["extra"]["training"]
    assert history["steps"] == 3  # one batch of 8 per epoch (9 // 8), never the 1 left over
    assert history["complete"] and len(history["loss"]) == 3
    assert all(torch.isfinite(torch.tensor(history["loss"])))


def test_a_batch_size_of_one_is_refused_before_training(bn_model):
    model, x, y = bn_model
    with pytest.raises(CompactnnError, match=r"^batch_size=1 with 9 training samples: .*'bn'"):
        compactnn.train(model, recipe(1), (x, y), epochs=1, **KW)


def test_data_of_one_sample_is_refused_naming_its_size(bn_model):
    model, x, y = bn_model
    with pytest.raises(
        CompactnnError, match=r"holds 1 training sample \(batch_size=8\).*at least 2"
    ):
        compactnn.train(model, recipe(8), (x[:1], y[:1]), epochs=1, **KW)


def test_a_dataloader_of_batch_size_one_is_refused(bn_model):
    model, x, y = bn_model
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    with pytest.raises(
        CompactnnError,
        match=r"the DataLoader.s batch_size=1 with 9 training samples: .*batch_size=2 or more",
    ):
        compactnn.train(model, recipe(8), loader, epochs=1, **KW)


def test_a_dataloaders_batch_of_one_sample_is_skipped(bn_model):
    model, x, y = bn_model
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 4, 4, then 1
    with pytest.warns(UserWarning, match=r"DataLoader's batch_size=4 leaves 1 .*drop_last=True"):
        q = compactnn.train(model, recipe(8), loader, epochs=2, **KW)
    assert q._compactnn["extra"]["training"]["steps"] == 4


def test_a_resumed_run_drops_the_same_batches_and_counts_the_same_steps(bn_model, tmp_path):
    model, x, y = bn_model
    kw = dict(epochs=2, **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = compactnn.train(model, recipe(4), (x, y), **kw)  # 9 = 4 + 4 + 1: 2 steps
        ck = tmp_path / "ck"
        compactnn.train(model, recipe(4), (x, y), checkpoint_dir=ck, max_steps=3, **kw)
        resumed = compactnn.train(model, recipe(4), (x, y), checkpoint_dir=ck, **kw)
    a, b = whole._compactnn["extra"]["training"], resumed._compactnn["extra"]["training"]
    assert a["steps"] == b["steps"] == 4
    assert a["loss"] == b["loss"]
    for (k, v), w in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_batch_norms_on_maps_keep_every_batch(tiny):
    """TinyNet's batch norms see 8x8 and 4x4 maps: a batch of one trains them, nothing is
    dropped (and its convs fold them anyway)."""
    model, (x, y), _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = compactnn.train(model, recipe(8), (x[:9], y[:9]), epochs=1, **KW)
    assert q._compactnn["extra"]["training"]["steps"] == 2
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3))
    assert single_value_norm(conv, torch.zeros(2, 1, 4, 4)) is None
    assert single_value_norm(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), x.new_zeros(2, 2))


@pytest.mark.parametrize(("n", "bs", "need", "steps"), [(9, 8, 2, 1), (9, 8, 1, 2), (10, 8, 2, 2)])
def test_steps_count_the_batches_kept(n, bs, need, steps):
    data = TrainData(x=torch.arange(n).float(), y=torch.zeros(n).long(), min_batch=need)
    batches = list(data.batches(bs, 0, 0))
    assert data.steps(bs) == len(batches) == steps
    assert min(len(b[0]) for b in batches) >= need
