"""The chain matchers of the plan runner (``deployment/chains.py``) read the graph's structure
before they ask for the compiled extension: a plain int8 CNN (no Hardswish, Hardsigmoid gate,
depthwise block or global pool before a quantize) never triggers its build through them."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import compactnn
from compactnn.deployment import chains


class _PlainNet(nn.Module):
    """The tester's 8x8 CNN: conv-BN-ReLU, conv-ReLU, a 2x2 average pool, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )  # fmt: skip
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def _no_build(*_args, **_kwargs):
    raise AssertionError("the extension was asked for")


def test_plain_cnn_chains_never_ask_for_the_extension(monkeypatch):
    torch.manual_seed(0)
    calib = torch.randn(16, 1, 8, 8)
    qmodel = compactnn.compress(_PlainNet().eval(), "w4a8", calib_data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = compactnn.deploy(qmodel, "onednn", example=calib).program
    monkeypatch.setattr(chains.bitconv, "available", _no_build)
    monkeypatch.setattr(chains.bitconv, "load_extension", _no_build)
    nodes = list(gm.graph.nodes)
    assert sum(n.op == "call_module" for n in nodes) >= 6  # convs, quantizes, pool, head
    for node in nodes:
        assert chains.pooled_quantize(gm, node) is None
        assert chains.dw_block_chain(gm, node) is None
        assert chains.hardswish_chain(gm, node) is None
        assert chains.gate_chain(gm, node) is None


class _Gated(nn.Module):
    """conv -> Hardswish, then a Hardsigmoid gate multiplied into the map and quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Hardswish())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1), nn.Hardsigmoid())
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.out(y * self.gate(y))


def test_chains_without_the_extension_are_not_taken(monkeypatch):
    """Where a chain's structure is there, the extension decides: unavailable, no chain."""
    torch.manual_seed(0)
    calib = torch.randn(8, 3, 12, 12)
    qmodel = compactnn.compress(_Gated().eval(), "w8a8", calib_data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = compactnn.deploy(qmodel, "onednn", example=calib).program
    asked = []
    monkeypatch.setattr(chains.bitconv, "available", lambda *a: asked.append(1) or False)
    for node in gm.graph.nodes:
        assert chains.hardswish_chain(gm, node) is None
        assert chains.gate_chain(gm, node) is None
        assert chains.pooled_quantize(gm, node) is None
    assert len(asked) >= 2  # the Hardswish and the gate chains reached the question
