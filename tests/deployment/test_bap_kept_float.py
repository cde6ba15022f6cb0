"""Binary augmented layers run as float convolutions in a deployed model: deploy names them
in ``kept_float`` and the runtime label counts them (``compactnn eval``'s "runs on")."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment.traced import BAP_REASON
from compactnn.errors import CompactnnError
from compactnn.report.delivery import runtime_name


class TinyVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


@pytest.fixture(scope="module")
def bap_model():
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.train(TinyVGG(), "w1a8-bap", (x, y), epochs=1, seed=0, progress=False)
    return q.eval(), x[:8]


def test_deploy_names_every_bap_layer_as_float(bap_model):
    q, x = bap_model
    bap_names = {n for n, m in q.named_modules() if type(m).__name__ == "BAPLayer"}
    assert bap_names == {"features.2", "features.5"}  # first and last layers stay 8-bit
    with pytest.warns(UserWarning, match=r"kept in float.*features\.2, features\.5"):
        deployed = compactnn.deploy(q, backend="onednn", example=x, time_float=False)
    assert deployed.kept_float == {"features.2": BAP_REASON, "features.5": BAP_REASON}
    assert runtime_name(deployed) == "oneDNN int8 (2 layers float)"
    # the float convolutions are really there: one conv2d call per BAP layer
    convs = [n for n in deployed.program.graph.nodes if n.target is torch.conv2d]
    assert len(convs) == 2
    assert deployed.verification.passed


def test_unsupported_error_refuses_bap_layers(bap_model):
    q, x = bap_model
    with pytest.raises(CompactnnError, match=r"features\.2"):
        compactnn.deploy(q, backend="onednn", example=x, unsupported="error")


def test_onnxruntime_names_them_too(bap_model):
    pytest.importorskip("onnxruntime")
    q, x = bap_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its int32 biases move it ~3 steps: a wider tolerance
        deployed = compactnn.deploy(q, backend="onnxruntime", example=x, tolerance=6)
    assert deployed.kept_float == {"features.2": BAP_REASON, "features.5": BAP_REASON}
    assert runtime_name(deployed) == "ONNX Runtime int8 (2 layers float)"
