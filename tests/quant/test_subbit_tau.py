"""``to_subbit`` keeps the tau a model was trained with: another one is refused (it would
drop trained patterns, or pay more bits for the same ones) unless forced."""

from __future__ import annotations

import copy

import pytest
import torch

import compactnn
from compactnn.core.qlayers import QuantConv2d
from compactnn.errors import CompactnnError
from compactnn.quant.subbit import SubbitConv2d, to_subbit, trained_tau
from tests.quant._ptq_models import images, tiny_resnet


@pytest.fixture(scope="module")
def trained():
    """A tiny ResNet built with ``w1a8-subbit`` (tau 6), and its inputs."""
    torch.manual_seed(0)
    x = images(16)
    q = compactnn.compress(tiny_resnet(), "w1a8-subbit", calib_data=[x], progress=False)
    return q.eval(), x


def _taus(model) -> dict[str, int]:
    return {n: m.tau for n, m in model.named_modules() if isinstance(m, SubbitConv2d)}


def test_another_tau_is_refused_naming_the_trained_one(trained):
    q, _ = trained
    assert trained_tau(q) == (6, "w1a8-subbit")
    with pytest.raises(CompactnnError) as info:
        to_subbit(q, 4)
    msg = str(info.value)
    assert "trained with 'w1a8-subbit' at tau=6 (at most 64 patterns per layer)" in msg
    assert "tau=4 keeps only each layer's 16 most frequent patterns" in msg
    assert "the outputs change" in msg and "to_subbit(model) (or tau=6)" in msg
    assert "SubbitConfig(tau=4)" in msg and "force=True" in msg
    with pytest.raises(CompactnnError, match=r"tau=8 stores 8 bits per kernel instead of 6"):
        to_subbit(q, 8)
    assert not _taus(q)  # refused before any layer changed
    assert sum(isinstance(m, QuantConv2d) for m in q.modules()) >= 2


def test_default_and_trained_tau_keep_the_outputs_exactly(trained):
    q, x = trained
    with torch.no_grad():
        ref = q(x)
        for tau in (None, 6):
            sub = to_subbit(copy.deepcopy(q), tau).eval()
            assert set(_taus(sub).values()) == {6}
            assert torch.equal(sub(x), ref)


def test_force_maps_to_another_tau(trained):
    q, x = trained
    sub = to_subbit(copy.deepcopy(q), 4, force=True).eval()
    assert set(_taus(sub).values()) == {4}
    with torch.no_grad():
        assert not torch.equal(sub(x), q(x))  # 16 of up to 64 patterns kept: outputs move


def test_post_hoc_mapping_needs_an_explicit_valid_tau():
    x = images(16)
    q = compactnn.compress(tiny_resnet(), "w1a8-xnor", calib_data=[x], progress=False)
    assert trained_tau(q) is None
    with pytest.raises(CompactnnError, match=r"not trained with sub-bit kernels.*pass tau="):
        to_subbit(copy.deepcopy(q))
    with pytest.raises(CompactnnError, match=r"tau=3 must be an integer in 4\.\.8"):
        to_subbit(copy.deepcopy(q), 3)
    assert set(_taus(to_subbit(q, 4)).values()) == {4}
