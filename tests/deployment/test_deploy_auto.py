"""backend="auto": the candidates it builds, verifies and times, the backend it keeps, the
warnings it gives (kept layers, skipped ONNX Runtime, "float is faster") and the float twin
it times."""

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import api as deploy_api
from compactnn.deployment import float_check
from compactnn.errors import CompactnnError
from tests.deployment.conftest import WithConv1d, steps


def test_auto_warns_only_about_the_chosen_backends_kept_layers(monkeypatch):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    qmodel = compactnn.compress(WithConv1d(), "w8a8", calib_data=x, progress=False)
    times = {"onnxruntime": 1.0, "onednn": 2.0}  # the ONNX Runtime candidate keeps nothing
    monkeypatch.setattr(float_check, "time_contenders", lambda c, _x, **_: {k: times[k] for k in c})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deployed = compactnn.deploy(qmodel, example=x, time_float=False)
    assert deployed.backend == "onnxruntime" and deployed.kept_float == {}
    assert not [w for w in caught if "kept in float" in str(w.message)]
    with torch.no_grad():
        assert steps(qmodel(x), deployed(x)) <= 1.0
    with pytest.raises(CompactnnError, match=r"ignore=\['seq'\]"):
        compactnn.deploy(qmodel, "onednn", example=x, unsupported="error")


def test_missing_onnxruntime_names_the_extra(qnet, monkeypatch):
    qmodel, calib = qnet
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(CompactnnError, match=r"pip install 'compactnn\[onnx\]'"):
        compactnn.deploy(qmodel, "onnxruntime", example=calib[:4])
    with pytest.warns(UserWarning, match=r"skipped backends: onnxruntime: .*compactnn\[onnx\]"):
        deployed = compactnn.deploy(qmodel, example=calib[:4])  # auto: oneDNN only
    assert deployed.backend == "onednn" and set(deployed.selection) == {"onednn", "fp32-eager"}


class _Off(nn.Module):
    """A wrong 'integer' program: the simulation's output shifted by 100 output steps."""

    def __init__(self, sim: nn.Module) -> None:
        super().__init__()
        self.sim = sim

    def forward(self, x):
        return self.sim(x) + 100.0


def test_auto_keeps_the_backend_that_passes_verification(monkeypatch, qnet):
    qmodel, calib = qnet
    real_build = deploy_api._build

    def build(backend, sim, *args):
        if backend == "onnxruntime":  # make this candidate diverge
            return deploy_api.DeployedModel(_Off(copy.deepcopy(sim)), "onnxruntime", {})
        return real_build(backend, sim, *args)

    monkeypatch.setattr(deploy_api, "_build", build)
    with pytest.warns(UserWarning, match=r"failed verification: onnxruntime"):
        fast = compactnn.deploy(qmodel, example=calib[:8])
    assert fast.backend == "onednn" and fast.verification.passed
    assert "onnxruntime" not in fast.selection  # the failed candidate is not timed


def test_auto_raises_when_every_backend_diverges(monkeypatch, qnet):
    qmodel, calib = qnet
    monkeypatch.setattr(
        deploy_api,
        "_build",
        lambda backend, sim, *a: deploy_api.DeployedModel(_Off(copy.deepcopy(sim)), backend, {}),
    )
    with pytest.raises(CompactnnError, match="steps") as caught:
        compactnn.deploy(qmodel, example=calib[:8])
    message = str(caught.value)  # each backend's reason, not only the first one's
    assert "onednn: deploy[onednn]: max difference" in message
    assert "onnxruntime: deploy[onnxruntime]: max difference" in message
    assert "Raise tolerance= (--tolerance) only" in message


class _Broken(nn.Module):
    """A program that fails with an error that is not a CompactnnError (a bug of ours)."""

    def forward(self, x):
        raise ValueError("kernel fault")


def _failing_build(fail: dict, real):
    """A ``_build`` whose candidates in ``fail`` raise ("build") or run a broken program."""

    def build(backend, sim, *args):
        if fail.get(backend) == "build":
            raise AttributeError(f"'int' object has no attribute 'dtype' ({backend})")
        if fail.get(backend) == "run":
            return deploy_api.DeployedModel(_Broken(), backend, {})
        return real(backend, sim, *args)

    return build


@pytest.mark.parametrize("how", ["build", "run"])
def test_auto_keeps_the_backend_that_works_when_the_other_raises(monkeypatch, qnet, how):
    pytest.importorskip("onnxruntime")
    qmodel, calib = qnet
    monkeypatch.setattr(deploy_api, "_build", _failing_build({"onednn": how}, deploy_api._build))
    with pytest.warns(UserWarning, match=r"skipped backends: onednn: (AttributeError|ValueError)"):
        fast = compactnn.deploy(qmodel, example=calib[:8], time_float=False)
    assert fast.backend == "onnxruntime" and fast.verification.passed
    with torch.no_grad():
        assert steps(qmodel(calib[:8]), fast(calib[:8])) <= 1.0


def test_every_backends_error_is_one_compactnn_error_with_its_cause(monkeypatch, qnet):
    pytest.importorskip("onnxruntime")
    qmodel, calib = qnet
    fail = {"onednn": "build", "onnxruntime": "run"}
    monkeypatch.setattr(deploy_api, "_build", _failing_build(fail, deploy_api._build))
    with pytest.raises(CompactnnError, match=r"onednn: AttributeError.*onnxruntime: ValueError"):
        compactnn.deploy(qmodel, example=calib[:8])
    with pytest.raises(CompactnnError, match=r"deploy\[onednn\]: AttributeError") as caught:
        compactnn.deploy(qmodel, "onednn", example=calib[:8])  # one backend: the same
    assert isinstance(caught.value.__cause__, AttributeError)  # chained, for debugging


def test_auto_says_when_float_is_faster(monkeypatch, qnet):
    qmodel, calib = qnet
    times = {"onednn": 0.004, "onnxruntime": 0.003, "fp32-onnxruntime": 0.001, "fp32-eager": 0.01}
    monkeypatch.setattr(
        float_check,
        "time_contenders",
        lambda contenders, ex, **_: {k: times[k] for k in contenders},
    )
    with pytest.warns(UserWarning, match=r"ONNX Runtime fp32 runs this model 3\.0x faster"):
        fast = compactnn.deploy(qmodel, example=calib[:4])
    assert fast.backend == "onnxruntime" and fast.selection == times
    assert "1.00 ms against 3.00 ms" in fast.recommendation
    times.update({"fp32-onnxruntime": 0.0029, "fp32-eager": 0.01})  # within the 10% margin
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(TorchScript|removed).*")
        warnings.filterwarnings("ignore", message=r"deploy\[onnxruntime\]: this form runs")
        fast = compactnn.deploy(qmodel, example=calib[:4])
    assert fast.recommendation is None
    fast = compactnn.deploy(qmodel, example=calib[:4], time_float=False)
    assert set(fast.selection) == {"onednn", "onnxruntime"} and fast.recommendation is None


def test_float_model_is_the_simulation_without_quantizers(qnet):
    from compactnn.core.qlayers import ActQuantizer

    qmodel, calib = qnet
    fmodel = float_check.float_model(qmodel)
    assert not any(type(m).__name__.startswith("Quant") for m in fmodel.modules())
    off = copy.deepcopy(qmodel)  # the simulation's own forward with its quantizers off
    for m in off.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = False
    with torch.no_grad():
        assert torch.allclose(fmodel(calib[:4]), off(calib[:4]), atol=1e-6)
        assert not torch.allclose(fmodel(calib[:4]), qmodel(calib[:4]), atol=1e-6)


def test_an_amplifying_networks_refusal_names_both_tolerance_spellings():
    from compactnn.lowering.verify import Verification

    result = Verification("deploy[onednn]", 13.3, 0.1, 0.0075, 1.0, 2.0, 8, sensitivity=11.0)
    message = deploy_api._verification_refusal(result)
    assert result.amplified and "FAILED" in message
    assert message.endswith("deploy with tolerance=20 (--tolerance 20 on the command line).")
