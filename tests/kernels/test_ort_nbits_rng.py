"""``to_ort_nbits`` draws nothing from the caller's random number generator."""

from __future__ import annotations

import pytest
import torch

from compactnn.kernels.ort_nbits import dequantized_model, to_ort_nbits
from tests.kernels._keywords import compressed

pytest.importorskip("onnxruntime")


def test_dequantized_model_keeps_the_rng_and_the_weights():
    q, _ = compressed("w4-g32")
    torch.manual_seed(42)
    before = torch.get_rng_state()
    plain, found = dequantized_model(q)
    assert torch.equal(torch.get_rng_state(), before)
    assert found  # layers were rebuilt
    for name, layer, *_ in found.values():
        lin = plain.get_submodule(name)
        assert torch.equal(lin.weight, layer.weight.detach().float())
        assert not lin.weight.is_meta and (lin.bias is None or not lin.bias.is_meta)


def test_to_ort_nbits_keeps_the_users_rng(tmp_path):
    q, batch = compressed("w4-g32")
    torch.manual_seed(42)
    before = torch.get_rng_state()
    to_ort_nbits(q, batch, path=tmp_path / "m.onnx")
    assert torch.equal(torch.get_rng_state(), before)
