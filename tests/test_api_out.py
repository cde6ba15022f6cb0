"""`compactnn.compress(model, recipe, data, out=DIR)` saves the artifact there (it was
ignored without max_memory: a following load(DIR) failed), refusing a bad path first."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(32, 8)


def test_out_saves_the_compressed_model(tmp_path):
    model, x = _model()
    q = compactnn.compress(model, "w8a8", x, progress=False, out=tmp_path / "a")
    back = compactnn.load(tmp_path / "a", model=model)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_an_existing_artifact_needs_force_and_is_refused_before_the_work(tmp_path, monkeypatch):
    model, x = _model()
    compactnn.compress(model, "w8a8", x, progress=False, out=tmp_path / "a")
    calls = []
    monkeypatch.setattr(compactnn.api, "_compress", lambda *a, **k: calls.append(1))
    with pytest.raises(CompactnnError, match="force"):
        compactnn.compress(model, "w8a8", x, progress=False, out=tmp_path / "a")
    assert calls == []
    monkeypatch.undo()
    q = compactnn.compress(model, "w4a8", x, progress=False, out=tmp_path / "a", force=True)
    with torch.no_grad():
        assert torch.equal(compactnn.load(tmp_path / "a", model=model)(x), q(x))
