import pytest
import torch

from compactnn import models
from compactnn.model_io import resolve_data, resolve_model
from compactnn.models.lazy import LazyReference


@pytest.fixture
def lazy_ref(monkeypatch):
    """A reference model ``lazy-ref`` whose data counts how often it is read."""
    reads = []

    def data():
        reads.append(1)
        return [torch.ones(4, 3)], torch.zeros(2, 3)

    def build(progress=True):
        return LazyReference(
            data=data,
            name="lazy-ref",
            model=torch.nn.Linear(3, 2),
            evaluate=lambda m: 0.0,
            metric="top1",
            kind="cnn",
            skeleton=lambda: torch.nn.Linear(3, 2),
        )

    monkeypatch.setitem(models.REFERENCES, "lazy-ref", build)
    return reads


def test_a_reference_model_loads_without_reading_its_data(lazy_ref):
    loaded = resolve_model("lazy-ref")
    assert lazy_ref == []  # a data-free run or one on --data FILE stops here
    assert torch.equal(resolve_data(None, loaded)[0], torch.ones(4, 3))
    assert torch.equal(loaded.example, torch.zeros(2, 3))
    assert lazy_ref == [1]


def test_a_reference_models_data_can_be_replaced(lazy_ref):
    loaded = resolve_model("lazy-ref")
    loaded.calib = [torch.full((1, 3), 7.0)]
    assert loaded.calib[0][0, 0] == 7.0 and lazy_ref == []
