"""The ONNX Runtime candidate of ``deploy``: built from the model the user passes (with
``quantize_residuals(grids="all")`` when they chose it), same numbers as its export."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import quantize_residuals

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from compactnn.export.onnx import fold_float_outputs, to_onnx_bytes  # noqa: E402
from compactnn.export.ort import optimized_graph, ort_callable  # noqa: E402


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.conv2(torch.relu(self.conv1(h))) + h)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(3)
    calib = torch.randn(16, 3, 10, 10)
    qmodel = compactnn.compress(ResNetish().eval(), "w8a8", calib_data=calib, progress=False)
    return qmodel, quantize_residuals(qmodel, calib, grids="all"), calib


def test_folded_head_gives_bit_identical_outputs(models):
    _, qall, calib = models
    data, _ = to_onnx_bytes(qall, calib[:4])
    folded = fold_float_outputs(data)
    x = torch.randn(6, 3, 10, 10)
    assert torch.equal(ort_callable(data)(x), ort_callable(folded)(x))
    # the head's weight is now the float (codes - zero) * scale; the export keeps the codes
    graph = onnx.load_from_string(folded).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    (gemm,) = [n for n in graph.node if n.op_type == "Gemm"]
    weight = inits[gemm.input[1]]
    fc = qall.get_submodule("fc")
    expected = (fc.weight_codes.float() - fc.weight_zero.reshape(-1, 1)) * fc.weight_scale.reshape(
        -1, 1
    )
    assert weight.dtype == np.float32 and np.array_equal(weight, expected.numpy())
    ops = [n.op_type for n in optimized_graph(folded).graph.node]
    assert "QLinearConv" in ops and "Conv" not in ops and "FusedConv" not in ops


def test_auto_builds_the_onnx_runtime_candidate_from_the_model_passed(models):
    _, qall, calib = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed = compactnn.deploy(qall, example=calib[:8], time_float=False)
    assert set(deployed.selection) == {"onednn", "onnxruntime"}  # both verified and timed
    assert deployed.verification.passed
    ort_model = compactnn.deploy(qall, "onnxruntime", example=calib[:8])
    x = torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        ref, got = qall(x), ort_model(x)
    step = (ref.max() - ref.min()).item() / 255
    assert (ref - got).abs().max().item() <= step  # the grids='all' simulation, not plain w8a8
    with torch.no_grad():
        plain = models[0](x)
    assert not torch.equal(plain, ref)


class GroupNormNet(nn.Module):
    """Conv1d + GroupNorm (an audio front end): group_norm's batch-size check reads a size
    as a bool, which the ONNX exporter's trace warns about."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv1d(1, 8, 5, stride=2, padding=2), nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).mean(-1))


def test_torchs_own_shape_checks_do_not_warn_while_the_exporter_traces():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 64)
    qmodel = compactnn.compress(GroupNormNet().eval(), "w8a8", calib_data=x, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deployed = compactnn.deploy(qmodel, example=x[:4])  # both candidates, the float one
    assert deployed.verification.passed
    assert [str(w.message) for w in caught if w.category is torch.jit.TracerWarning] == []
    from compactnn.deployment.calling import quiet_shape_checks as _quiet_shape_checks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet_shape_checks():
            for module in ("torch.nn.functional", "mymodel"):  # the model's own still warn
                warnings.warn_explicit("a bool", torch.jit.TracerWarning, f"{module}.py", 1, module)
    assert [w.filename for w in caught] == ["mymodel.py"]


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.cls, self.box = nn.Conv2d(3, 8, 3), nn.Linear(8, 10), nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(x).relu().mean((2, 3))
        return {"logits": self.cls(h), "box": self.box(h)}


def test_a_dict_output_comes_back_as_the_same_dict_on_onnx_runtime():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 12)
    q = compactnn.compress(_TwoHeads().eval(), "w8a8", calib_data=x, progress=False)
    out = compactnn.deploy(q, example=x[:8], backend="onnxruntime")(x[:8])
    with torch.no_grad():
        sim = q(x[:8])
    assert isinstance(out, dict) and list(out) == ["logits", "box"]
    for key in sim:
        step = float(sim[key].abs().max()) / 127  # about one output step
        torch.testing.assert_close(out[key], sim[key], atol=3 * step, rtol=0)
