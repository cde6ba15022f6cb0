"""`compactnn train`: the default data of each reference, the message without one, and the
help's recipe list."""

import types

import pytest
from torch import nn

from compactnn.cli import main
from compactnn.commands.train import REFERENCE_DATA, training_data
from compactnn.errors import CompactnnError
from compactnn.model_io import LoadedModel


def _loaded(reference_name: str | None) -> LoadedModel:
    ref = None if reference_name is None else types.SimpleNamespace(name=reference_name)
    return LoadedModel(model=nn.Linear(2, 2), source=reference_name or "m.pt2", reference=ref)


def test_digits_resnet_trains_on_its_own_data_set_by_default(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "compactnn.commands.train.labelled_data", lambda spec: calls.append(spec) or spec
    )
    assert training_data(None, _loaded("digits-resnet")) == "digits"
    assert training_data(None, _loaded("mnist-cnn")) == "mnist"
    assert REFERENCE_DATA["digits-resnet"] == "digits"


@pytest.mark.parametrize(
    "name, whose",
    [("tiny-lm", "the reference 'tiny-lm' has no labelled data set"), (None, "no reference")],
)
def test_without_a_data_set_the_message_does_not_send_a_model_to_mnist(name, whose):
    with pytest.raises(CompactnnError) as err:
        training_data(None, _loaded(name))
    message = str(err.value)
    assert whose in message and "--data file.safetensors" in message
    assert "\n" not in message


def test_train_help_points_to_the_recipe_list(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "`compactnn recipes` lists every form" in out and "w2a2-tsq" in out
