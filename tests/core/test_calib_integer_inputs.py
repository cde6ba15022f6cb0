"""Integer calibration inputs and labels in dict batches get one line naming the fix (tester
session 34: a uint8 / int64 tensor gave torch's raw dtype message with no cast, although
docs/own-model.md promises the cast; a dict batch with a ``label`` key was told to wrap each
batch as a 1-tuple, which fails too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import compactnn
from compactnn.core.input_dtypes import cast_for, label_key_hint
from compactnn.errors import CompactnnError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv1(x)).flatten(1))


class CastsItself(Net):
    """A model whose forward takes 8-bit pixels and scales them itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float() / 255)


def _net(cls: type = Net) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _x() -> torch.Tensor:
    return torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _pixels() -> torch.Tensor:
    return (_x().clamp(-2, 2) * 60 + 128).to(torch.uint8)


@pytest.mark.parametrize(
    ("data", "dtype", "cast"),
    [
        (_pixels(), "uint8", "x.float() / 255"),
        ((_x() * 10).long(), "int64", "x.float() (scaled"),
        # the (inputs, labels) form: the inputs are named, the int64 labels are not
        (
            DataLoader(TensorDataset(_pixels(), torch.arange(48)), batch_size=16),
            "uint8",
            "x.float() / 255",
        ),
        ([{"x": _pixels()[:16]}], "uint8", "x.float() / 255"),  # keyword inputs
    ],
)
def test_integer_inputs_are_refused_naming_the_dtype_and_the_cast(data, dtype, cast):
    with pytest.raises(CompactnnError) as caught:
        compactnn.compress(_net(), "w8a8", calib_data=data, progress=False)
    text = str(caught.value)
    assert text.startswith("calibration batch 0")
    assert f" holds {dtype} values (shape (" in text and "\n" not in text
    assert "reach its layer 'conv1', a Conv2d" in text and f"e.g. {cast}" in text
    assert "bias type" not in text  # not torch's raw message


def test_a_forward_that_casts_its_own_pixels_still_calibrates_on_them():
    q = compactnn.compress(_net(CastsItself), "w8a8", calib_data=_pixels(), progress=False)
    with torch.no_grad():
        assert q(_pixels()[:4]).shape == (4, 10)


def test_token_ids_for_an_embedding_stay_integers():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 6, 4)).eval()
    ids = torch.randint(0, 50, (32, 6), generator=torch.Generator().manual_seed(2))
    q = compactnn.compress(model, "w8a8", calib_data=ids, progress=False)
    with torch.no_grad():
        assert q(ids[:2]).shape == (2, 4)


class _Dicts(Dataset):
    def __init__(self, key: str) -> None:
        self.key, self.x = key, _x()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], self.key: torch.tensor(i % 10)}


@pytest.mark.parametrize("key", ["label", "labels"])
def test_a_label_key_in_a_dict_batch_is_named_with_a_fix_that_works(key):
    loader = DataLoader(_Dicts(key), batch_size=16)
    with pytest.raises(CompactnnError) as caught:
        compactnn.compress(_net(), "w8a8", calib_data=loader, progress=False)
    text = str(caught.value)
    assert f"'{key}' holds labels, not an input of Net.forward" in text
    assert "passing each batch b as b['x']" in text and "(inputs, labels) pairs" in text
    assert "1-tuple" not in text  # forward(dict) fails on this model too
    ref = compactnn.compress(_net(), "w8a8", calib_data=_x(), progress=False)
    with torch.no_grad():
        for fixed in ([b["x"] for b in loader], [(b["x"], b[key]) for b in loader]):
            q = compactnn.compress(_net(), "w8a8", calib_data=fixed, progress=False)
            assert torch.equal(q(_x()[:8]), ref(_x()[:8]))


def test_the_label_hint_keeps_every_input_and_spares_a_forward_that_takes_labels():
    class TwoInputs(nn.Module):
        def forward(self, a, b):
            return a + b

    class TakesLabels(nn.Module):
        def forward(self, x, labels=None):
            return x

    batch = {"a": 1, "b": 2, "label": 3, "y": 4}
    hint = label_key_hint(TwoInputs(), batch)
    assert hint.startswith("'label' and 'y' hold labels")
    assert "{k: v for k, v in b.items() if k not in ('label', 'y')}" in hint
    assert label_key_hint(TakesLabels(), {"x": 1, "labels": 2}) is None
    assert cast_for(torch.int32) == "x.float() (scaled as the model was trained)"
