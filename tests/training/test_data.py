"""Which tensors of a labelled mapping training and evaluation read."""

import pytest
import torch

from compactnn.errors import CompactnnError
from compactnn.training.data import (
    as_eval_data,
    as_train_data,
    float_dtype,
    labelled_keys,
    split_note,
)


def _both() -> dict[str, torch.Tensor]:
    """A file's worth of data with a training split and a held-out split."""
    return {
        "x_train": torch.zeros(6, 2),
        "y_train": torch.zeros(6, dtype=torch.long),
        "x_test": torch.ones(4, 2),
        "y_test": torch.ones(4, dtype=torch.long),
    }


def test_evaluation_reads_the_held_out_split_and_training_the_training_split():
    data = _both()
    x, y = as_eval_data(data)
    assert torch.equal(x, data["x_test"]) and torch.equal(y, data["y_test"])
    train = as_train_data(data)
    assert torch.equal(train.x, data["x_train"]) and torch.equal(train.y, data["y_train"])


def test_plain_x_y_is_read_by_both_roles_and_a_test_split_beside_it_is_held_out():
    xy = {"x": torch.zeros(3, 2), "y": torch.tensor([0, 1, 0])}
    assert labelled_keys(xy, "train") == labelled_keys(xy, "eval") == ("x", "y")
    beside = {**xy, "x_test": torch.ones(2, 2), "y_test": torch.tensor([1, 1])}
    assert labelled_keys(beside, "train") == ("x", "y")
    assert labelled_keys(beside, "eval") == ("x_test", "y_test")
    assert labelled_keys({"inputs": 0, "labels": 0}, "eval") == ("inputs", "labels")
    assert labelled_keys({"x": 0, "y_test": 0}, "eval") is None
    with pytest.raises(ValueError, match="role"):
        labelled_keys(xy, "calibration")


def test_split_note_names_the_split_used_only_when_there_was_a_choice():
    keys = list(_both())
    assert split_note(keys, ("x_test", "y_test"), "--data") == (
        "--data holds x_train/y_train and x_test/y_test: using x_test/y_test (the held-out split)"
    )
    assert split_note(keys, ("x_train", "y_train")).endswith("x_train/y_train (the training split)")
    assert split_note(["x", "y"], ("x", "y")) is None
    assert split_note(["x_train", "y_train", "x_test"], ("x_train", "y_train")) is None


def test_a_mapping_without_a_labelled_pair_names_the_keys_it_needs():
    with pytest.raises(CompactnnError, match=r"x_test/y_test"):
        as_eval_data({"x_test": torch.zeros(2, 2)})
    with pytest.raises(CompactnnError, match=r"x_train/y_train"):
        as_train_data({"x_train": torch.zeros(2, 2), "y": torch.zeros(2)})


def test_empty_training_data_is_refused_in_one_line():
    with pytest.raises(CompactnnError, match="training data is empty"):
        as_train_data((torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))


def test_floating_inputs_are_cast_to_the_dtype_given_and_integer_ones_kept():
    half = torch.tensor([[0.5, 1.5]], dtype=torch.float16)
    ids, y = torch.tensor([[3, 4]]), torch.tensor([1])
    dtype = float_dtype(torch.nn.Linear(2, 2))
    assert dtype == torch.float32
    x = as_train_data((half, y), dtype=dtype).x
    assert x.dtype == torch.float32 and x.tolist() == [[0.5, 1.5]]
    assert as_train_data((ids, y), dtype=dtype).x.dtype == torch.int64
    assert as_train_data((half, y)).x.dtype == torch.float16  # no dtype: as given
    loader = as_train_data([(half.double(), y)], dtype=dtype)
    ((bx, by),) = loader.batches(4, epoch=0, seed=0)
    assert bx.dtype == torch.float32 and bx.tolist() == [[0.5, 1.5]] and by.tolist() == [1]
    assert loader.calibration()[0].dtype == torch.float32
    assert as_eval_data((half, y), dtype=dtype)[0].dtype == torch.float32


def test_labels_beside_keyword_inputs_are_split_per_role():
    from compactnn.training.data import as_eval_data, keyword_split

    ids, mask, y = torch.arange(6).view(3, 2), torch.ones(3, 2).long(), torch.tensor([0, 1, 0])
    inputs, labels = keyword_split({"input_ids": ids, "attention_mask": mask, "labels": y})
    assert set(inputs) == {"input_ids", "attention_mask"} and labels is y
    both = {"input_ids_train": ids, "y_train": y, "input_ids_test": ids[:2], "y_test": y[:2]}
    train, y_train = keyword_split(both, "train")
    test, y_test = keyword_split(both, "eval")
    assert train["input_ids"] is ids and y_train is y
    assert torch.equal(test["input_ids"], ids[:2]) and torch.equal(y_test, y[:2])
    assert keyword_split({"x": ids, "y": y}) is None  # an x/y pair: labelled_keys reads it
    assert keyword_split({"input_ids": ids, "attention_mask": mask}) is None  # no labels
    x, got = as_eval_data({"input_ids": ids, "y": y, "pixel_values": torch.rand(3, 2)})
    assert set(x) == {"input_ids", "pixel_values"} and got is y
    with pytest.raises(CompactnnError, match="2 inputs but 3 labels"):
        as_eval_data(({"input_ids": ids[:2]}, y))


def test_an_eval_loader_is_named_as_the_type_not_as_unlabelled():
    """compactnn.train(..., eval_data=DataLoader(...)) said the loader "has no labels",
    though it yields (x, y): eval_data takes tensors."""
    from torch.utils.data import DataLoader, TensorDataset

    from compactnn.errors import CompactnnError
    from compactnn.training.data import as_eval_data

    loader = DataLoader(TensorDataset(torch.zeros(4, 2), torch.zeros(4)), batch_size=2)
    with pytest.raises(
        CompactnnError, match="takes \\(inputs, labels\\) tensors, not a DataLoader"
    ):
        as_eval_data(loader, "eval_data")
    with pytest.raises(CompactnnError, match="of type Tensor has no labels"):
        as_eval_data(torch.zeros(3, 2), "eval_data")
