"""A ``y`` that the model's forward takes is one of its inputs, not labels."""

from __future__ import annotations

import torch
from torch import nn

from compactnn.commands._common import calib_inputs, split_labels


class TwoIn(nn.Module):
    def forward(self, x, y):
        return x + y


class MaybeY(nn.Module):
    def forward(self, x, y=None):
        return x


def test_a_float_y_the_forward_requires_is_an_input(capsys):
    data = {"x": torch.ones(4, 1, 8, 8), "y": torch.full((4, 1, 8, 8), 2.0)}
    inputs, labels = split_labels(data, role="train", model=TwoIn())
    assert labels is None and sorted(inputs) == ["x", "y"]
    assert torch.equal(TwoIn()(**inputs), torch.full((4, 1, 8, 8), 3.0))
    err = capsys.readouterr().err
    assert "TwoIn.forward takes both" in err and "y is not read as labels" in err


def test_class_labels_stay_labels(capsys):
    data = {"x": torch.ones(4, 3), "y": torch.tensor([0, 1, 0, 1])}
    for model in (nn.Linear(3, 2), MaybeY(), None):
        inputs, labels = split_labels(data, role="train", model=model)
        assert torch.equal(inputs, data["x"]) and torch.equal(labels, data["y"])
    assert "not read as labels" not in capsys.readouterr().err


def test_calib_inputs_of_a_two_input_model(tmp_path):
    from safetensors.torch import save_file

    from compactnn.model_io import LoadedModel

    x, y = torch.ones(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)
    save_file({"x": x, "y": y}, str(tmp_path / "two.safetensors"))
    got = calib_inputs(str(tmp_path / "two.safetensors"), LoadedModel(TwoIn(), "m:two"))
    assert torch.equal(got["x"], x) and torch.equal(got["y"], y)


def test_calibration_names_the_inputs_it_reads(capsys):
    data = {"x": torch.ones(5, 3), "y": torch.tensor([0, 1, 0, 1, 1])}
    split_labels(data, role="train", what="--data test_xy.safetensors")
    err = capsys.readouterr().err
    assert err == (
        "note: --data test_xy.safetensors holds x/y: calibrating on x (5 examples; the "
        "labels y are not used)\n"
    )
    split_labels(data, role="eval")  # scoring reads both: nothing to say
    assert capsys.readouterr().err == ""
