"""Bad numbers are caught where they enter: calibration batches, activations observed during
calibration, and the model handed to ``compress`` (issue 11)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.calib import as_batches, check_example
from compactnn.core.observer import RangeObserver
from compactnn.errors import CompactnnError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _data() -> torch.Tensor:
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


class Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


def test_one_nan_in_calibration_data_names_the_batch_and_rows():
    x = _data()
    x[40, 3] = float("nan")  # row 40 is row 8 of the second batch of 32
    with pytest.raises(CompactnnError, match=r"batch 1 \(rows 32\.\.63 .*1 NaN .*\(8, 3\)"):
        compactnn.compress(_net(), "w8a8", calib_data=x, progress=False)


def test_inf_in_a_tuple_batch_names_batch_and_element():
    batches = [(_data()[:8], torch.zeros(8)), (torch.full((8, 16), float("inf")), torch.zeros(8))]
    with pytest.raises(CompactnnError, match=r"batch 1\[0\] holds 0 NaN and 128 Inf"):
        as_batches(batches)


def test_nan_in_a_dict_batch_names_the_key():
    batch = {"x": torch.tensor([[1.0, float("nan")]]), "ids": torch.ones(1, 2, dtype=torch.long)}
    with pytest.raises(CompactnnError, match=r"batch 0\['x'\] holds 1 NaN"):
        as_batches(batch)


def test_finite_data_passes_unchanged():
    x = _data()
    batches = as_batches(x)
    assert torch.equal(torch.cat(batches), x)


def test_activation_overflowing_inside_the_model_names_batch_and_layer():
    model = nn.Sequential(nn.Linear(16, 16), Exp(), nn.Linear(16, 4)).eval()
    x = _data()
    x[40:] *= 1e4  # finite input; exp() of the second batch overflows to inf
    with pytest.raises(CompactnnError, match=r"calibration batch 1, input of layer '2'.*NaN/Inf"):
        compactnn.compress(model, "w8a8", calib_data=x, progress=False)


def test_mis_scaled_data_whose_range_no_scale_can_hold_is_refused():
    with pytest.raises(CompactnnError, match=r"layer '0'.*span .*e\+30.*mis-scaled"):
        compactnn.compress(_net(), "w8a8", calib_data=_data() * 1e30, progress=False)


def test_all_zero_data_warns_and_names_the_collapsed_layer():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = compactnn.compress(_net(), "w8a8", calib_data=torch.zeros(8, 16), progress=False)
    messages = [str(w.message) for w in caught]
    assert any("all zeros" in m for m in messages)
    assert any("layer '0'" in m and "zero width" in m for m in messages)
    assert any("layer '0'" in n for n in q._compactnn["notes"])  # in the report too


def test_real_data_gives_no_range_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compactnn.compress(_net(), "w8a8", calib_data=_data(), progress=False)
    assert not [w for w in caught if "zero width" in str(w.message) or "zeros" in str(w.message)]


def test_observer_refuses_non_finite_values():
    obs = RangeObserver("minmax", keep_samples=False)
    obs.update(torch.ones(4))
    with pytest.raises(CompactnnError, match="1 NaN/Inf value"):
        obs.update(torch.tensor([1.0, float("-inf")]))
    assert float(obs.min) == 1.0 and float(obs.max) == 1.0  # state untouched by the bad batch
    assert obs.collapsed


def test_half_precision_model_is_refused_with_the_fix():
    with pytest.raises(CompactnnError, match=r"'0.weight' is torch.float16.*model.float\(\)"):
        compactnn.compress(_net().half(), "w8", progress=False)


def test_bfloat16_buffer_is_refused():
    model = _net()
    model.register_buffer("table", torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(CompactnnError, match=r"'table' is torch.bfloat16"):
        compactnn.compress(model, "w8", progress=False)


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(CompactnnError, match=r"'weight' is on the meta device.*to_empty"):
        compactnn.compress(model, "w8", progress=False)


@pytest.mark.parametrize(
    ("example", "needle"),
    [
        (torch.zeros(0, 16), "is empty"),
        ({}, "is empty"),
        ((), "is empty"),
        (torch.tensor([[float("nan")] * 16]), "example= holds 16 NaN"),
        ("images", "must be a tensor"),
    ],
)
def test_bad_examples_are_refused(example, needle):
    with pytest.raises(CompactnnError, match=needle):
        check_example(example)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype) -> None:
    """The sum shortcut gives the element-wise answer, including sums that overflow."""
    from compactnn.core.calib import all_finite

    big = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(16, 1, 28, 28, generator=g, dtype=dtype),
        torch.full((1000,), big, dtype=dtype),  # finite values whose sum overflows
        torch.tensor([big, -big, big], dtype=dtype),
        torch.empty(0, dtype=dtype),
        torch.tensor([1.0, float("nan")], dtype=dtype),
        torch.tensor([float("inf"), float("-inf")], dtype=dtype),  # sum NaN
        torch.tensor([-float("inf"), 2.0], dtype=dtype),
    ]
    for t in cases:
        pos = torch.randint(0, max(t.numel(), 1), (1,), generator=g)
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
        if t.numel():  # one NaN anywhere in an otherwise finite tensor
            u = t.clone().reshape(-1)
            u[pos] = float("nan")
            assert not all_finite(u)


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.fc(batch["image"] + batch["meta"])


def test_a_dict_batch_hint_says_keywords_and_how_to_pass_it_whole():
    batch = {"image": torch.rand(8, 4), "meta": torch.rand(8, 4)}
    with pytest.raises(CompactnnError, match=r"keyword arguments.*1-tuple") as err:
        compactnn.compress(DictNet(), "w8a8", calib_data=[batch], progress=False)
    assert "Expected input" not in str(err.value)
    q = compactnn.compress(DictNet(), "w8a8", calib_data=[(batch,)], progress=False)
    check_example((batch,))  # a dict inside a tuple is not empty
    with pytest.raises(CompactnnError, match=r"\[0\]\['meta'\] holds 1 NaN"):
        check_example(({"image": batch["image"], "meta": torch.tensor([[float("nan")]])},))
    assert q((batch,)[0]).shape == (8, 2)


def test_float64_calibration_tensors_are_cast_to_the_model_dtype():
    x = torch.randn(16, 16, dtype=torch.float64)
    q = compactnn.compress(_net(), "w8a8", calib_data=x, progress=False)
    ref = compactnn.compress(_net(), "w8a8", calib_data=x.float(), progress=False)
    assert torch.equal(q(x.float()), ref(x.float()))


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_hf_token_ids_out_of_the_vocabulary_or_too_long_are_named(arch):
    pytest.importorskip("transformers")
    from compactnn.models.tiny_hf import tiny_model

    model, _ = tiny_model(arch)  # vocabulary 128, 64 positions
    gen = torch.Generator().manual_seed(0)
    big = {"input_ids": torch.randint(128, 200, (2, 8), generator=gen)}
    with pytest.raises(CompactnnError) as err:
        compactnn.compress(model, "w8a8", calib_data=[big], progress=False)
    assert str(err.value).startswith("calib_data holds token ids out of the model's vocabulary")
    assert "the vocabulary has 128 entries" in str(err.value)
    long = {"input_ids": torch.randint(0, 128, (2, 96), generator=gen)}
    with pytest.raises(CompactnnError) as err:
        compactnn.compress(model, "w8a8", calib_data=[long], progress=False)
    key = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    assert str(err.value) == (
        f"calib_data holds sequences of 96 tokens and the model takes at most 64 ({key} in "
        "its config.json): cut each sequence to 64 tokens or fewer (e.g. ids[:, :64], or "
        "windows of 64)."
    )


def test_input_spec_names_dtypes_and_shapes_of_every_batch_form():
    from compactnn.core.calib import expected_inputs, input_spec

    ids = {"input_ids": torch.zeros(2, 7, dtype=torch.long), "mask": torch.ones(2, 7)}
    assert input_spec(ids, rows=True) == (
        "keywords input_ids=int64 values of shape (N, L), mask=float32 values of shape (N, 7)"
    )
    assert input_spec(ids) == (
        "keywords input_ids=int64 values of shape (2, 7), mask=float32 values of shape (2, 7)"
    )
    assert input_spec((torch.zeros(5), 3)) == "a tuple (float32 values of shape (5,), int)"
    example = torch.zeros(64, 1, 28, 28)
    assert expected_inputs(_net(), example) == (
        "float32 values of shape (N, 1, 28, 28), like its example input (64, 1, 28, 28)"
    )
    half = nn.Sequential(nn.Linear(16, 4)).half()
    assert expected_inputs(half, None) == "float16 values of shape (..., 16) (first layer '0')"


def test_keyword_inputs_are_split_into_batches_of_rows_like_a_tensor():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (70, 6), generator=gen)
    mask = (torch.rand(70, 6, generator=gen) > 0.2).long()
    batches = as_batches({"input_ids": ids, "attention_mask": mask})
    assert [b["input_ids"].shape[0] for b in batches] == [32, 32, 6]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ids)
    assert torch.equal(torch.cat([b["attention_mask"] for b in batches]), mask)
    # values that are not one row per example (a flag, rows that differ): one batch, as given
    odd = {"input_ids": ids, "flag": torch.tensor(1)}
    assert len(as_batches(odd)) == 1 and as_batches(odd)[0]["input_ids"] is ids
    assert len(as_batches({"a": ids, "b": ids[:40]})) == 1
    assert len(as_batches({"input_ids": ids[:32]})) == 1  # one batch's worth


class _PixelModel(nn.Module):
    """Takes pixel_values only, like a Hugging Face image model (other keywords swallowed)."""

    main_input_name = "pixel_values"

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, pixel_values=None, **kwargs):
        return self.fc(pixel_values.to(self.fc.weight.dtype))


def test_a_dict_without_the_models_main_input_is_named_in_one_line():
    from compactnn.core.calib import check_batch

    batch = {"input_ids": torch.zeros(2, 4).long(), "attention_mask": torch.ones(2, 4).long()}
    with pytest.raises(CompactnnError) as err:
        check_batch(_PixelModel(), batch, "auto")
    assert str(err.value) == (
        "the calibration data does not fit the model: it holds attention_mask, input_ids but "
        "_PixelModel's main input is 'pixel_values': save the inputs under pixel_values (or "
        "as the file's only tensor), made for this model."
    )
    check_batch(_PixelModel(), {"pixel_values": torch.rand(2, 4)}, "auto")  # runs


def test_data_is_named_by_its_role_and_a_scalar_is_not_a_batch():
    x = _data()[:40].clone()
    x[33, 2] = float("nan")
    with pytest.raises(CompactnnError, match=r"^calibration batch 1 \(rows 32\.\.39 of calib_"):
        as_batches(x)
    with pytest.raises(CompactnnError) as err:
        as_batches(x, what="--data eval.npy")
    assert str(err.value).startswith("batch 1 (rows 32..39 of --data eval.npy) holds 1 NaN")
    with pytest.raises(CompactnnError) as err:
        as_batches([x[:32], x[32:]], what="--data e.safetensors")
    assert str(err.value).startswith("batch 1 of --data e.safetensors holds 1 NaN")
    with pytest.raises(CompactnnError) as err:
        as_batches(torch.tensor(3.0), what="--data s.npy")
    assert str(err.value).startswith("--data s.npy is a scalar (a 0-d tensor), not a batch")
    with pytest.raises(CompactnnError, match=r"^calib_data is empty \(a tensor of shape \(0, 16\)"):
        as_batches(x[:0])


def test_an_all_padding_batch_is_named_by_its_role():
    """Evaluation data whose attention_mask is all 0 was called a "calibration batch"."""
    ids = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4)}
    with pytest.raises(CompactnnError, match=r"^batch 0 of --data e\.safetensors: every"):
        as_batches(ids, what="--data e.safetensors")
    with pytest.raises(CompactnnError, match=r"^calibration batch 0: every"):
        as_batches(ids)
