"""compactnn.core.provenance: what compress records of its float model and calibration data."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import compactnn
from compactnn.core.provenance import MIN_CALIB_SAMPLES, calibration_summary, state_sha256
from compactnn.export.artifact import read_header


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()


X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _compress(model, recipe, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = compactnn.compress(model, recipe, calib_data=x, progress=False)
    return q, [str(w.message) for w in caught]


def test_state_digest_is_of_names_shapes_and_bytes():
    a, b = _net(), _net()
    assert state_sha256(a) == state_sha256(b)
    with torch.no_grad():
        b[0].weight[0, 0, 0, 0] += 1e-6
    assert state_sha256(a) != state_sha256(b)
    assert state_sha256(nn.Linear(2, 2, device="meta")) is None  # no data to digest


def test_python_compress_records_the_float_model_and_calibration(tmp_path):
    model = _net()
    q, _ = _compress(model, "w8a8", X)
    compactnn.save(q, tmp_path / "a")
    extra = read_header(tmp_path / "a")["extra"]
    assert extra["float_model"] == {"sha256": state_sha256(model), "tensors": 4}
    calib = extra["calibration"]
    assert (calib["samples"], calib["batches"]) == (64, 2)
    assert "torch_threads" not in calib  # machine-independent: identical runs, identical bytes
    assert calib["inputs_sha256"] == calibration_summary(list(X.split(32)))["inputs_sha256"]
    other, _ = _compress(model, "w8a8", X.flip(0))  # same samples, other order of batches
    assert other._compactnn["extra"]["calibration"]["inputs_sha256"] != calib["inputs_sha256"]
    loaded = compactnn.load(tmp_path / "a", model=_net())  # the new keys load as before
    assert loaded._compactnn["extra"]["float_model"]["sha256"] == state_sha256(model)


def test_a_second_compress_keeps_the_first_float_model():
    model = _net()
    q, _ = _compress(model, "sp50", X)
    again, _ = _compress(q, "w8a8", X)
    assert again._compactnn["extra"]["float_model"]["sha256"] == state_sha256(model)


def test_few_calibration_samples_warn_once_for_an_activation_recipe():
    _, said = _compress(_net(), "w8a8", X[:3])
    few = [m for m in said if "calibration sample" in m]
    assert few == [
        "only 3 calibration samples were given: activation ranges observed on so few inputs "
        f"miss the values other inputs reach; pass {MIN_CALIB_SAMPLES} or more (a few hundred "
        "is typical)."
    ]
    _, said = _compress(_net(), "w8a8", X[:MIN_CALIB_SAMPLES])
    assert not [m for m in said if "calibration sample" in m]
    _, said = _compress(_net(), "w4", X[:3])  # weight-only: no ranges observed
    assert not [m for m in said if "calibration sample" in m]


def test_a_method_that_warns_of_its_own_needs_is_not_warned_twice():
    _, said = _compress(_net(), "w8a8-biascorr", X[:3])
    few = [m for m in said if "calibration sample" in m]
    assert len(few) == 1 and few[0].startswith("biascorr: only 3")


def test_token_batches_and_generated_images_are_not_counted_as_few_samples():
    """Eight sequences observe every token's activations; generated images' count is the
    user's --data-free-images, named by its own record (T6)."""
    from compactnn.datafree.common import GeneratedData

    lm = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 16))
    ids = torch.randint(0, 32, (8, 24), generator=torch.Generator().manual_seed(0))
    _, said = _compress(lm, "w8a8", ids)
    assert not [m for m in said if "calibration sample" in m]
    x = X[:4]
    data = GeneratedData(x, torch.zeros(4, dtype=torch.long), {"method": "bn-inversion"})
    _, said = _compress(_net(), "w8a8", data)
    assert not [m for m in said if "calibration sample" in m]
