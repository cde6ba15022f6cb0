"""A ``forward`` with an optional argument (``forward(x, scale=None)``) the example leaves
unset: ONNX export and the oneDNN deployment trace it with its default (torch.fx used to
trace ``None`` as a graph input and fail on ``y * scale``); an example that gives it uses it."""

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import compactnn
from compactnn.core.calib import unfilled_defaults
from compactnn.export.onnx import export_onnx
from compactnn.lowering.graph import trace


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.f = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.f(torch.relu(self.c(x)).flatten(1))
        return y if scale is None else y * scale


def _quantized() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    return compactnn.compress(Scaled().eval(), "w8a8", [x], progress=False), x


def test_unfilled_defaults_by_example_form() -> None:
    m = Scaled()
    x = torch.zeros(1)
    assert unfilled_defaults(m, None) is None
    assert unfilled_defaults(m, x) == {"scale": None}
    assert unfilled_defaults(m, (x, x)) is None
    assert unfilled_defaults(m, {"x": x}) == {"scale": None}


def test_trace_keeps_the_default_branch() -> None:
    q, x = _quantized()
    gm = trace(q, x)
    torch.testing.assert_close(gm(x), q(x), rtol=0, atol=0)


def test_onnx_export_of_an_optional_argument(tmp_path) -> None:
    q, x = _quantized()
    export_onnx(q, tmp_path / "m.onnx", x)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert len(session.get_inputs()) == 1
    np.testing.assert_allclose(out, q(x).detach().numpy(), atol=1e-4)


def test_onednn_deploy_with_and_without_the_optional_argument() -> None:
    q, x = _quantized()
    with torch.no_grad():
        deployed = compactnn.deploy(q, "onednn", example=x)
        torch.testing.assert_close(deployed(x), q(x), atol=1e-5, rtol=0)
        s = torch.full((4, 3), 2.0)
        given = compactnn.deploy(q, "onednn", example=(x, s))
        torch.testing.assert_close(given(x, s), q(x) * 2, atol=1e-5, rtol=0)
