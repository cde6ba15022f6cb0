"""The sensitivity cache file: written after each format, keyed on everything the scores
depend on, never trusting a damaged file, never failing a search it cannot be written to."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from compactnn.mixed_precision import sensitivity as sens
from compactnn.mixed_precision.formats import parse_formats
from compactnn.mixed_precision.sensitivity import SensitivityCache, data_digests, sensitivity


def model_and_data(act=nn.ReLU):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 4)).eval()
    return model, [torch.randn(16, 8) for _ in range(2)]


def test_each_format_is_written_as_it_ends(tmp_path, monkeypatch):
    model, batches = model_and_data()
    fmts = parse_formats("w2a8,w3a8,w4a8")
    calls = []
    real = sens.format_weight

    def interrupted(w, fmt, original=None):
        if fmt.name == "w4a8":
            raise KeyboardInterrupt
        calls.append(fmt.name)
        return real(w, fmt, original)

    monkeypatch.setattr(sens, "format_weight", interrupted)
    path = tmp_path / "s.json"
    with pytest.raises(KeyboardInterrupt):
        sensitivity(model, ["0", "2"], fmts, batches, cache=SensitivityCache(path), progress=False)
    assert len(json.loads(path.read_text())["entries"]) == 2
    monkeypatch.setattr(sens, "format_weight", real)
    resumed = sensitivity(model, ["0", "2"], fmts, batches, cache=SensitivityCache(path))
    whole = sensitivity(model, ["0", "2"], fmts, batches, progress=False)
    np.testing.assert_array_equal(resumed, whole)


def test_an_unwritable_cache_warns_once_and_the_scores_still_come(tmp_path):
    model, batches = model_and_data()
    (tmp_path / "f").write_text("a file")
    cache = SensitivityCache(tmp_path / "f" / "s.json")  # its folder is a file
    with pytest.warns(UserWarning, match=r"cannot write the sensitivity cache .*uncached") as w:
        got = sensitivity(model, ["0", "2"], parse_formats("w2a8,w4a8"), batches, cache=cache)
    assert len(w) == 1 and cache.path is None and len(cache.entries) == 2
    assert np.isfinite(got).all()


def test_the_model_digest_covers_structure_and_buffers_and_the_data_its_keys():
    model, batches = model_and_data()
    other, _ = model_and_data(nn.GELU)  # the same weights, another activation
    assert data_digests(model, batches)[0] != data_digests(other, batches)[0]
    model.register_buffer("scale", torch.ones(1), persistent=False)
    digest = data_digests(model, batches)[0]
    model.scale.fill_(2.0)  # a buffer outside the state dict still counts
    assert data_digests(model, batches)[0] != digest
    a = [{"x": batches[0], "y": batches[1]}]
    b = [{"y": batches[0], "x": batches[1]}]
    assert data_digests(model, a)[1] != data_digests(model, b)[1]


def test_caches_sharing_a_file_keep_each_others_scores(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    one, two = SensitivityCache(path), SensitivityCache(path)  # two searches at once
    one.put("a" * 64, ["l"], [1.0])
    two.put("b" * 64, ["l"], [2.0])
    assert set(SensitivityCache(path).entries) == {"a" * 64, "b" * 64}
    monkeypatch.setattr(sens, "MAX_ENTRIES", 2)
    one.put("c" * 64, ["l"], [3.0])  # the oldest goes
    assert list(SensitivityCache(path).entries) == ["a" * 64, "c" * 64]
