"""Shipping a deployed model: save_deployed / load_deployed re-deploy and re-verify."""

import json
import warnings

import pytest
import torch

import compactnn
from compactnn import api
from compactnn.deployment import api as deploy_api
from compactnn.deployment import load_deployed, quantize_residuals, save_deployed, ship
from compactnn.deployment.onednn import Int8Conv2d
from compactnn.errors import ArtifactError, CompactnnError
from tests.deployment.conftest import make_net
from tests.deployment.test_deploy import _lower_with_bad_bias

# the skeleton is ``type(qmodel)()``: pytest imports conftest.py under its own module name,
# and an artifact records the class's module


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_round_trip_gives_the_same_outputs_on_the_same_backend(qnet, backend, tmp_path):
    qmodel, calib = qnet
    fast = compactnn.deploy(qmodel, backend, example=calib[:12])
    digest = save_deployed(fast, tmp_path / "a")
    back = load_deployed(tmp_path / "a", model=type(qmodel)(), expect_sha256=digest)
    assert back.backend == backend and back.verification.passed
    assert back.verification.samples == ship.MAX_SAMPLES  # the stored batch, capped
    assert torch.equal(back.example, calib[: ship.MAX_SAMPLES])
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(back(x), fast(x))  # same codes, same kernels: bit-identical
    assert "deployment" not in back.source._compactnn["extra"]


def test_low_bit_codes_stay_packed_and_reach_the_kernels(tmp_path):
    torch.manual_seed(2)
    calib = torch.randn(16, 3, 16, 16)
    qmodel = compactnn.compress(make_net(), "w4a8", calib_data=calib, progress=False)
    fast = compactnn.deploy(qmodel, "onednn", example=calib[:4])
    save_deployed(fast, tmp_path / "a")
    header = json.loads((tmp_path / "a" / "compactnn.json").read_text())
    four = [n for n, e in header["layers"].items() if e["weight_spec"]["bits"] == 4]
    assert "pw.0" in four  # w4a8 keeps the first and last layers at 8 bits
    pw = qmodel.get_submodule("pw.0")
    tensors = compactnn.export.artifact.parse_tensors(
        (tmp_path / "a" / "model.safetensors").read_bytes(), tmp_path
    )
    assert tensors["pw.0.weight.packed"].numel() == (pw.weight_codes.numel() + 1) // 2
    back = load_deployed(tmp_path / "a", model=type(qmodel)())
    codes = [m.w_int8 for m in back.program.modules() if isinstance(m, Int8Conv2d)]
    want = (pw.weight_codes - pw.weight_zero.reshape(-1, 1, 1, 1)).to(torch.int8)
    assert any(torch.equal(c, want) for c in codes)


def test_damaged_or_missing_batch_is_refused(qnet, tmp_path):
    qmodel, calib = qnet
    save_deployed(compactnn.deploy(qmodel, "onednn", example=calib[:4]), tmp_path / "a")
    path = tmp_path / "a" / ship.EXAMPLE_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="modified after saving"):
        load_deployed(tmp_path / "a", model=type(qmodel)())
    path.unlink()
    with pytest.raises(ArtifactError, match=r"deployment\.safetensors is missing"):
        load_deployed(tmp_path / "a", model=type(qmodel)())
    assert api.load(tmp_path / "a", model=type(qmodel)()) is not None  # still an artifact


def test_a_model_that_no_longer_verifies_is_refused_naming_the_layer(qnet, tmp_path, monkeypatch):
    qmodel, calib = qnet
    save_deployed(compactnn.deploy(qmodel, "onednn", example=calib[:8]), tmp_path / "a")
    monkeypatch.setattr(deploy_api, "lower", _lower_with_bad_bias("branch_a", 1.0))
    with pytest.raises(CompactnnError, match=r"cannot be rebuilt on this machine.*branch_a"):
        load_deployed(tmp_path / "a", model=type(qmodel)())


def test_what_cannot_be_shipped_is_refused(qnet, tmp_path):
    qmodel, calib = qnet
    with pytest.raises(CompactnnError, match=r"compactnn\.deploy returned"):
        save_deployed(qmodel, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qres = compactnn.deploy(quantize_residuals(qmodel), "onednn", example=calib[:4])
    with pytest.raises(CompactnnError, match="quantize_residuals"):
        save_deployed(qres, tmp_path / "b")
    compactnn.save(qmodel, tmp_path / "plain")
    with pytest.raises(CompactnnError, match="not a deployed one"):
        load_deployed(tmp_path / "plain", model=type(qmodel)())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_save_and_load_dispatch_on_what_they_get(qnet, tmp_path):
    qmodel, calib = qnet
    ship.save(qmodel, tmp_path / "plain")
    ship.save(compactnn.deploy(qmodel, "onednn", example=calib[:4]), tmp_path / "dep")
    assert not ship.is_deployed_artifact(tmp_path / "plain")
    assert ship.is_deployed_artifact(tmp_path / "dep")
    plain = ship.load(tmp_path / "plain", model=type(qmodel)())
    assert not isinstance(plain, deploy_api.DeployedModel)
    assert isinstance(ship.load(tmp_path / "dep", model=type(qmodel)()), deploy_api.DeployedModel)


@pytest.mark.parametrize(
    ("field", "value"),
    [("backend", "auto"), ("tolerance", -1.0), ("residual", "slow"), ("version", "1")],
)
def test_an_edited_record_is_refused_naming_the_field(field, value):
    record = _record()
    assert ship._check_record(record) is record
    with pytest.raises(ArtifactError, match=rf"extra\.deployment\.{field} .*damaged or was edited"):
        ship._check_record({**record, field: value})


def test_a_newer_record_asks_for_an_upgrade():
    with pytest.raises(ArtifactError, match=r"written by a newer compactnn .*upgrade compactnn"):
        ship._check_record({**_record(), "version": 2})


def _record() -> dict:
    return {
        "version": 1, "backend": "onednn", "residual": "exact", "tolerance": 2.0,
        "unsupported": "float", "verification": "ok",
        "example": {"file": ship.EXAMPLE_FILE, "bytes": 10, "sha256": "0" * 64,
                    "layout": "tensor", "keys": ["x"]},
    }  # fmt: skip
