"""backend="auto" prefers integer kernels to speed (a backend that keeps quantized layers in
float wins only when every candidate does, and the warning says which kept what), and
re-times a close race before it advises a float path (tester session 27)."""

import warnings

import pytest
import torch

import compactnn
import compactnn.export.onnx as onnx_export
from compactnn.deployment import api as deploy_api
from compactnn.deployment import float_check, load_deployed, save_deployed
from tests.deployment.conftest import make_net, steps


@pytest.fixture(scope="module")
def inq():
    torch.manual_seed(3)
    calib = torch.randn(32, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(make_net(), "w5a8-inq", calib_data=calib, progress=False)
    return q, calib


def test_auto_keeps_the_backend_that_runs_every_layer_on_integer_kernels(
    inq, monkeypatch, tmp_path
):
    """The INQ CNN: auto chose onnxruntime (faster) with its codebook layers stored float,
    where onednn ran all of them int8. Here ONNX Runtime is made faster and made to store
    codebook weights float (the export before it wrote a negative-scale row as int8)."""
    pytest.importorskip("onnxruntime")
    qmodel, calib = inq
    monkeypatch.setattr(onnx_export, "codebook_terms", lambda layer: None)
    times = {"onnxruntime": 0.001, "onednn": 0.002}
    monkeypatch.setattr(float_check, "time_contenders", lambda c, _x, **_: {k: times[k] for k in c})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = compactnn.deploy(qmodel, example=calib[:8], time_float=False)
    assert fast.backend == "onednn" and fast.kept_float == {}
    notes = [str(w.message) for w in caught if "chose onednn" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    assert "onnxruntime, which keeps in float" in notes[0] and "codebook weights" in notes[0]
    assert "stem.0" in notes[0]  # the layers are named
    assert not [w for w in caught if "kept in float (simulated" in str(w.message)]
    with torch.no_grad():
        assert steps(qmodel(calib), fast(calib)) <= 1.0
    save_deployed(fast, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = load_deployed(tmp_path / "a", model=make_net())
    assert back.backend == "onednn" and back.kept_float == {}  # the reload keeps the choice
    with torch.no_grad():
        assert torch.equal(back(calib[:8]), fast(calib[:8]))


def test_when_every_backend_keeps_layers_float_the_faster_wins_and_says_so(inq, monkeypatch):
    """onednn made to keep the same layers float as ONNX Runtime: no candidate runs them on
    integer kernels, so speed decides, and the warning names the backend and the others."""
    pytest.importorskip("onnxruntime")
    qmodel, calib = inq
    monkeypatch.setattr(onnx_export, "codebook_terms", lambda layer: None)
    build = deploy_api._build

    def same_kept(backend, sim, *args):
        built = build(backend, sim, *args)
        if backend == "onednn":
            built.kept_float = build("onnxruntime", sim, *args).kept_float
        return built

    monkeypatch.setattr(deploy_api, "_build", same_kept)
    times = {"onnxruntime": 0.001, "onednn": 0.002}
    monkeypatch.setattr(float_check, "time_contenders", lambda c, _x, **_: {k: times[k] for k in c})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = compactnn.deploy(qmodel, example=calib[:8], time_float=False)
    assert fast.backend == "onnxruntime" and len(fast.kept_float) == 6
    texts = [str(w.message) for w in caught]
    kept = [t for t in texts if "kept in float (simulated" in t]
    assert len(kept) == 1 and kept[0].startswith("deploy[onnxruntime]: kept in float"), texts
    assert kept[0].endswith("; onednn kept at least as many in float")
    assert not [t for t in texts if "chose " in t]  # nobody passed over
    assert float_check.fewest_float({"a": {}, "b": {"fc": "r"}}) == ["a"]


RACES = {
    "loaded-onednn": [  # measured (odd CNN, w8a8, load 5.8): oneDNN's fastest of 7 was 53 ms
        {"onednn": 0.053, "onnxruntime": 0.00163, "fp32-onnxruntime": 0.00129, "fp32-eager": 0.34},
        {"onednn": 0.00081, "onnxruntime": 0.0015, "fp32-onnxruntime": 0.00117},
    ],
    "close-float": [
        {"onednn": 0.003, "onnxruntime": 0.004, "fp32-onnxruntime": 0.001, "fp32-eager": 0.02},
        {"onednn": 0.00081, "onnxruntime": 0.0039, "fp32-onnxruntime": 0.00105},
    ],
}


@pytest.mark.parametrize("race", sorted(RACES))
def test_a_close_race_is_timed_again_before_float_is_advised(qnet, monkeypatch, race):
    """Under load the 7-call race flipped the backend and the "ONNX Runtime fp32 N x faster"
    advice between identical runs: the first race is re-timed (every int8 candidate and the
    fastest float path, 12 calls more) before choosing or advising; a clear race is not."""
    qmodel, calib = qnet
    races, calls = RACES[race], []

    def fake(contenders, _x, runs=6):
        calls.append((sorted(contenders), runs))
        return {k: races[len(calls) - 1][k] for k in contenders}

    monkeypatch.setattr(float_check, "time_contenders", fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = compactnn.deploy(qmodel, example=calib[:4])
    assert calls[1] == (["fp32-onnxruntime", "onednn", "onnxruntime"], 12)
    assert fast.backend == "onednn" and fast.recommendation is None
    assert fast.selection["onednn"] == 0.00081 and fast.selection["fp32-eager"] >= 0.02
    assert not [w for w in caught if "faster than int8" in str(w.message)]
    clear = {"onednn": 0.001, "onnxruntime": 0.004, "fp32-onnxruntime": 0.003, "fp32-eager": 0.02}
    assert float_check.settled(clear, {}, None, ["onednn", "onnxruntime"]) == clear  # no re-time
