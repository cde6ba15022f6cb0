import pytest
import torch
from torch import nn

from compactnn.models import cache


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp_path / "a"))
    assert cache.cache_dir() == tmp_path / "a" and (tmp_path / "a").is_dir()
    monkeypatch.delenv("COMPACTNN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "compactnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "compactnn"


def test_cache_key_changes_with_code_seed_and_settings():
    base = cache.cache_key("m", ["def f(): pass"], seed=0, epochs=8)
    assert base == cache.cache_key("m", ["def f(): pass"], epochs=8, seed=0)
    assert len(base) == 16
    assert base != cache.cache_key("m", ["def f(): pass"], seed=1, epochs=8)
    assert base != cache.cache_key("m", ["def f(): return"], seed=0, epochs=8)
    assert base != cache.cache_key("m", ["def f(): pass"], seed=0, epochs=9)
    assert base != cache.cache_key("n", ["def f(): pass"], seed=0, epochs=8)
    # source boundaries count: ["ab", "c"] is not ["a", "bc"]
    assert cache.cache_key("m", ["ab", "c"]) != cache.cache_key("m", ["a", "bc"])


def _trainer(calls: list, value: float):
    def train(model: nn.Module) -> dict[str, str]:
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(value)
        return {"note": "trained"}

    return train


def test_load_or_train_trains_once_then_loads_bit_identical(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp_path))
    calls: list = []
    first, path = cache.load_or_train("lin", "k1", nn.Linear(3, 2), _trainer(calls, 0.25))
    second, path2 = cache.load_or_train("lin", "k1", nn.Linear(3, 2), _trainer(calls, 9.0))
    assert calls == [1] and path == path2 == tmp_path / "lin-k1.safetensors"
    assert cache.state_equal(first, second)
    assert torch.all(second.weight == 0.25)
    assert cache.cached_metadata(path) == {"note": "trained", "key": "k1", "name": "lin"}
    # a different key is a different file: retrained, the old one is kept
    third, _ = cache.load_or_train("lin", "k2", nn.Linear(3, 2), _trainer(calls, 0.5))
    assert calls == [1, 1] and torch.all(third.weight == 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lin-k1.safetensors",
        "lin-k2.safetensors",
    ]


def test_corrupt_cache_file_is_retrained(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp_path))
    (tmp_path / "lin-k1.safetensors").write_bytes(b"\x10\x00garbage")
    calls: list = []
    with pytest.warns(UserWarning, match="unreadable"):
        model, _ = cache.load_or_train("lin", "k1", nn.Linear(3, 2), _trainer(calls, 0.75))
    assert calls == [1] and torch.all(model.weight == 0.75)
    again, _ = cache.load_or_train("lin", "k1", nn.Linear(3, 2), _trainer(calls, 1.0))
    assert calls == [1] and torch.all(again.weight == 0.75)


def test_failed_training_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTNN_CACHE", str(tmp_path))

    def broken(model):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.load_or_train("lin", "k1", nn.Linear(3, 2), broken)
    assert list(tmp_path.iterdir()) == []
