"""What save refuses before anything is written (export/save_checks.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import compactnn
from compactnn.errors import CompactnnError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def _quantized() -> nn.Module:
    return compactnn.compress(_net(), "w8", progress=False)


def test_a_control_character_in_what_compress_recorded_is_the_users_input(tmp_path):
    q = _quantized()
    q._compactnn["notes"] = [*q._compactnn["notes"], "done \x1b[2J"]
    with pytest.raises(CompactnnError) as err:
        compactnn.save(q, tmp_path / "a")
    msg = str(err.value)
    assert msg.startswith("cannot save: ['extra']['notes']") and "U+001B" in msg
    assert "edited by hand" not in msg and "\x1b" not in msg
    assert not (tmp_path / "a").exists()  # nothing written
    q._compactnn["notes"] = [*q._compactnn["notes"][:-1], "two\nlines"]  # notes keep newlines
    compactnn.save(q, tmp_path / "b")
    assert "two\nlines" in compactnn.info_of(compactnn.load(tmp_path / "b", model=_net()))["notes"]


def test_a_live_parametrization_is_named_with_its_kind(tmp_path):
    q = _quantized()
    net = nn.Sequential(parametrizations.spectral_norm(nn.Linear(4, 4)))
    net._compactnn = q._compactnn
    with pytest.raises(CompactnnError, match=r"0\.weight \(_SpectralNorm\).*spectral_norm"):
        compactnn.save(net, tmp_path / "c")
    assert not (tmp_path / "c").exists()
