"""An artifact's record of its float model is read only as the kind it names: a kind this
compactnn does not know (from a newer one) is refused, never read as a reference model."""

from types import SimpleNamespace

import pytest

from compactnn import model_io
from compactnn.errors import CompactnnError


@pytest.fixture
def built(monkeypatch):
    """resolve_model stubbed: which spec skeleton_for would build, without building it."""
    calls = []

    def resolve(spec, **kw):
        calls.append(spec)
        return SimpleNamespace(source=spec, weights=None, reference=spec)

    monkeypatch.setattr(model_io, "resolve_model", resolve)
    return calls


def _header(source):
    return {"extra": {"source": source}}


def test_an_unknown_kind_is_refused_with_an_upgrade(built):
    header = _header({"kind": "future-kind", "model": "mnist-cnn"})
    with pytest.raises(
        CompactnnError,
        match=r"as a 'future-kind', a kind this compactnn does not know \(from a newer "
        r"compactnn\?\): upgrade compactnn, or pass the float model again: --model MODEL\.$",
    ):
        model_io.skeleton_for(header)
    for odd in ({"x": 1}, 3, None):
        with pytest.raises(CompactnnError, match="a kind this compactnn does not know"):
            model_io.skeleton_for(_header({"kind": odd, "model": "mnist-cnn"}))
    assert built == []
    assert model_io.skeleton_for(header, "mnist-cnn").source == "mnist-cnn"  # the user named it


def test_only_a_reference_record_is_rebuilt_by_name(built):
    assert model_io.skeleton_for(_header({"kind": "reference", "model": "mnist-cnn"}))
    assert model_io.skeleton_for(_header({"model": "mnist-cnn"}))  # records without a kind
    with pytest.raises(CompactnnError, match="made from the factory 'mnist-cnn'"):
        model_io.skeleton_for(_header({"kind": "factory", "model": "mnist-cnn"}))
    assert built == ["mnist-cnn", "mnist-cnn"]
