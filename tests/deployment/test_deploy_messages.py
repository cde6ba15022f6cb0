"""What deploy says when it quotes an exporter's error, is given a list or a plain float model,
chooses a form that runs one input size only, or is called with another float dtype."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import api as deploy_api
from compactnn.deployment import float_check, refusals
from compactnn.deployment.calling import fixed_size_note, other_size, runs_other_sizes
from compactnn.errors import CompactnnError

GRAPH_DUMP = (
    "Unsupported: ONNX export of operator adaptive pooling, since output_size is not constant."
    "\n    Inputs:\n        #0: x.3 defined in (%x.3 : Float(*, *, *, *) = onnx::Mul(%157, %158)"
    "\n    )  (type 'Tensor')" * 40
)


class FullyConv(nn.Module):
    """Convolutions then adaptive pooling: runs any input size."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class Flat(nn.Module):
    """A flatten into a Linear layer: runs its example's size only."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c1(x)).flatten(1))


def _compressed(cls: type) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    return compactnn.compress(cls().eval(), "w8a8", calib_data=x, progress=False), x[:4]


def test_an_ort_fp32_export_failure_is_quoted_by_its_first_line(monkeypatch):
    """s7.py: a 3,611-character warning, the exporter's error and its TorchScript graph."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    def fails(*args, **kwargs):
        raise RuntimeError(GRAPH_DUMP)

    monkeypatch.setattr(float_check, "ort_float", fails)
    q, x = _compressed(FullyConv)
    with pytest.warns(UserWarning, match="ONNX Runtime fp32 not timed") as record:
        out = float_check.float_contenders(q, x)
    said = next(str(w.message) for w in record if "not timed" in str(w.message))
    assert list(out) == ["fp32-eager"]
    assert "\n" not in said and "Inputs:" not in said and len(said) < 260
    assert "output_size is not constant" in said


def test_an_internal_error_is_named_by_its_first_line():
    reason = refusals.failure_reason(RuntimeError(GRAPH_DUMP))
    assert "\n" not in reason and "Inputs:" not in reason
    assert reason.startswith("RuntimeError: Unsupported: ONNX export of operator adaptive")
    assert reason.endswith("another backend may run it)")


def test_a_list_example_is_refused_up_front_with_the_accepted_forms():
    q, x = _compressed(FullyConv)
    with pytest.raises(CompactnnError) as err:
        compactnn.deploy(q, "onednn", example=[x])
    said = str(err.value)
    assert said.startswith("example= is a list [float32 values of shape (4, 1, 8, 8)]: pass a")
    assert "a tuple of tensors" in said and "a dict of named tensors" in said
    assert "unsupported operand" not in said and "\n" not in said
    assert compactnn.deploy(q, "onednn", example=(x,), time_float=False).backend == "onednn"


def test_deploy_of_a_float_model_speaks_to_a_python_caller():
    with pytest.raises(CompactnnError) as err:
        compactnn.deploy(FullyConv().eval(), example=torch.zeros(2, 1, 8, 8))
    said = str(err.value)
    assert said.startswith("nothing to deploy: qmodel is a plain float model")
    assert "compactnn.compress(model, 'w8a8', calib_data=x)" in said
    assert "compactnn eval" not in said and "ARTIFACT" not in said and "docs/cli" not in said
    assert "compactnn eval ARTIFACT" in refusals.PLAIN_FLOAT_CLI  # kept for the command line


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_a_deployed_model_refuses_another_float_dtype(backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    q, x = _compressed(FullyConv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = compactnn.deploy(q, backend, example=x, time_float=False)
    with pytest.raises(RuntimeError):  # the simulated model: torch's dtype mismatch
        q(x.double())
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(CompactnnError) as err:
            d(x.to(dtype))
        want = f"deployed model input 0 is {str(dtype)[6:]}; it was deployed for float32"
        assert str(err.value).startswith(want) and "x.to(torch.float32)" in str(err.value)
    with pytest.raises(CompactnnError, match="input 'x' is float64"):
        d(x=x.double())
    assert torch.equal(d(x), d(x=x))  # float32 still runs


def test_other_size_doubles_the_sizes_after_batch_and_channels():
    x = torch.randn(4, 3, 8, 6)
    assert other_size(x).shape == (1, 3, 16, 12)
    assert other_size(torch.randn(4, 16)) is None  # nothing whose size could change
    assert other_size(torch.zeros(4, 9, dtype=torch.long)) is None
    pair = other_size((x, torch.randn(4, 5)))
    assert pair[0].shape == (1, 3, 16, 12) and pair[1].shape == (1, 5)
    assert runs_other_sizes(FullyConv(), torch.randn(2, 1, 8, 8)) == ((2, 1, 8, 8), (1, 1, 16, 16))
    assert runs_other_sizes(Flat(), torch.randn(2, 1, 8, 8)) is None
    note = fixed_size_note("onnxruntime", (2, 1, 8, 8), (1, 1, 16, 16))
    assert "runs inputs of shape (N, 1, 8, 8) only" in note and "backend='onednn'" in note


def test_an_onnxruntime_deploy_says_its_size_is_fixed_when_the_model_runs_others():
    pytest.importorskip("onnxruntime")
    q, x = _compressed(FullyConv)
    with pytest.warns(UserWarning, match=r"runs inputs of shape \(N, 1, 8, 8\) only") as rec:
        d = compactnn.deploy(q, "onnxruntime", example=x, time_float=False)
    note = [str(w.message) for w in rec if "only (the size" in str(w.message)]
    assert len(note) == 1 and "\n" not in note[0] and "deploy once per input size" in note[0]
    with pytest.raises(CompactnnError, match="runs only the size it was deployed with"):
        d(torch.randn(2, 1, 16, 16))
    qf, xf = _compressed(Flat)  # runs its example's size only: nothing to say
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        compactnn.deploy(qf, "onnxruntime", example=xf, time_float=False)
    assert not [w for w in rec if "only (the size" in str(w.message)]


def _race(times: dict[str, float]):
    return lambda contenders, example, runs=6: {k: times[k] for k in contenders}


def test_auto_takes_the_any_size_form_when_the_race_is_close(monkeypatch):
    """A U-Net: auto chose ONNX Runtime (0.46 ms), fixed at its example's size, over oneDNN
    (any size) on a race within timing noise."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(float_check, "time_contenders", _race({"onednn": 1.05, "onnxruntime": 1}))
    q, x = _compressed(FullyConv)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        d = compactnn.deploy(q, example=x, time_float=False)
    assert d.backend == "onednn" and d.selection == {"onednn": 1.05, "onnxruntime": 1}
    assert not [w for w in rec if "only (the size" in str(w.message)]
    assert d(torch.randn(2, 1, 16, 16)).shape == (2, 4)  # any size
    qf, xf = _compressed(Flat)  # tied to its size anyway: the faster one
    assert compactnn.deploy(qf, example=xf, time_float=False).backend == "onnxruntime"
    slow = {"onednn": 1.0 * deploy_api.ANY_SIZE_MARGIN + 0.01, "onnxruntime": 1}
    monkeypatch.setattr(float_check, "time_contenders", _race(slow))  # a clear race: speed
    with pytest.warns(UserWarning, match=r"deploy\[onnxruntime\]: this form runs inputs"):
        assert compactnn.deploy(q, example=x, time_float=False).backend == "onnxruntime"
