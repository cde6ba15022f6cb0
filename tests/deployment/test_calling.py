"""The ONNX Runtime backend's trace of a recurrent model says nothing the user can act on:
torch's own LSTM/GRU shape checks and the exporter's batch-size note stay quiet (the file is
verified against the simulation), and deploy's own output handling raises no deprecation."""

import warnings

import pytest
import torch
from torch import nn

import compactnn


class _GRUHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_deploying_a_gru_on_onnx_runtime_prints_no_tracing_noise():
    pytest.importorskip("onnxruntime")
    x = torch.randn(8, 5, 4, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(_GRUHead().eval(), "w8a8", calib_data=x, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deployed = compactnn.deploy(q, "onnxruntime", example=x)
    # measured before: 4 TracerWarnings ("Converting a tensor to a Python boolean") from
    # torch.nn.modules.rnn and the exporter's "batch_size other than 1 ... GRU" note
    assert [str(w.message)[:80] for w in caught] == []
    assert deployed.verification.passed
    with torch.no_grad():  # and the file runs at another batch, equal to the simulation
        big = torch.randn(37, 5, 4, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(deployed(big), q(big), atol=0.05)
