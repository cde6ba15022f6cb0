from types import SimpleNamespace

import torch

from compactnn.models.trained import cached_train, training_key
from tests.training.conftest import tiny  # noqa: F401  (the fixture: a trained TinyNet)


def test_trains_once_then_reads_the_artifact_back(tiny, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp_path))
    model, (x, y), _ = tiny
    TinyNet = type(model)
    ref = SimpleNamespace(name="tiny", model=model, skeleton=TinyNet)
    data = (x[:64], y[:64])
    first, seconds, hit = cached_train(ref, "w2a8-ttq", data)
    assert not hit and seconds > 0
    again, seconds2, hit2 = cached_train(ref, "w2a8-ttq", data)
    assert hit2 and seconds2 == seconds  # the time of the run that made it
    assert torch.equal(first(x), again(x))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1  # no temporary left


def test_key_changes_with_seed_recipe_data_and_weights(tiny):  # noqa: F811
    model, (x, y), _ = tiny
    TinyNet = type(model)
    data = (x[:64], y[:64])
    key = training_key("tiny", model, "w2a8-ttq", data, 0)
    assert key == training_key("tiny", model, "w2a8-ttq", data, 0)
    assert key != training_key("tiny", model, "w2a8-ttq", data, 1)
    assert key != training_key("tiny", model, "w2a8-twn", data, 0)
    assert key != training_key("tiny", model, "w2a8-ttq", (x[:64], y[:64].flip(0)), 0)
    other = TinyNet()
    assert key != training_key("tiny", other, "w2a8-ttq", data, 0)
