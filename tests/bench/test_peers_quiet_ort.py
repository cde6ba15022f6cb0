"""ONNX Runtime's quantization tools do not print their root-logger notes in the bench
(bench/peers.py: ``bench.ort_quiet.quiet_ort_quantize`` around quantize_static /
quantize_dynamic; the filter itself is tested in test_runner_noise.py)."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("onnxruntime.quantization")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_ort_quantization_notes_are_not_logged(caplog):
    from compactnn.bench.peers import PeerResult, ort_models

    torch.manual_seed(0)
    handlers = list(logging.getLogger().handlers)
    with caplog.at_level(logging.INFO):
        out = ort_models(Tiny().eval(), torch.randn(4, 8), torch.randn(16, 8), threads=1)
    assert isinstance(out["ort-static-int8"], PeerResult), out["ort-static-int8"]
    assert isinstance(out["ort-dynamic-int8"], PeerResult), out["ort-dynamic-int8"]
    notes = [r.getMessage() for r in caplog.records if "onnxruntime" in r.pathname]
    assert not [n for n in notes if "out-of-range" in n or "pre-processing" in n], notes
    assert logging.getLogger().handlers == handlers
    assert not logging.getLogger().filters  # the filter goes with the calls
