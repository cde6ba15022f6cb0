"""Rebuilding a compressed model on its float skeleton: the skeleton's module versions
(state-dict ``_metadata``) reach the modules that read them while loading."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import compactnn
from compactnn.errors import ArtifactError
from compactnn.export import validate


class Versioned(nn.Module):
    """Reads its version from ``local_metadata`` while loading, as torchvision's MNASNet."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def _versioned_net() -> nn.Module:
    return nn.Sequential(Versioned(), nn.Linear(5, 3))


def test_a_module_reading_its_version_while_loading_round_trips(tmp_path):
    torch.manual_seed(0)
    model, x = _versioned_net().eval(), torch.randn(16, 6)
    q = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "q")
    loaded = compactnn.load(tmp_path / "q", model=_versioned_net())  # was ArtifactError
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert torch.equal(loaded[0].fc.weight_codes, q[0].fc.weight_codes)


def test_mnasnet_round_trips(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    make = lambda: torchvision.models.mnasnet0_5(weights=None, num_classes=4)  # noqa: E731
    x = torch.randn(2, 3, 32, 32)
    q = compactnn.compress(make().eval(), "w8", progress=False)
    compactnn.save(q, tmp_path / "q")
    loaded = compactnn.load(tmp_path / "q", model=make())  # was "version should be set ..."
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_a_module_reading_its_version_loads_straight_onto_kernels(tmp_path):
    """load(kernels=True) fills the skeleton's meta tensors with its own load_state_dict:
    the modules' versions must reach it too."""
    torch.manual_seed(0)
    model = nn.Sequential(Versioned(), nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    q = compactnn.compress(model, "w8", progress=False)
    compactnn.save(q, tmp_path / "q")
    skeleton = nn.Sequential(Versioned(), nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64))
    fast = compactnn.load(tmp_path / "q", model=skeleton, kernels=True)  # was ValueError
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), compactnn.to_kernels(q)(x), atol=0, rtol=0)


class _Attend(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.fc(self.attn(h, h, h, need_weights=False)[0] + h)


def _edit_extra(root, edit) -> None:
    """Apply ``edit`` to the header's ``extra`` and recompute the header digest."""
    header = json.loads((root / "compactnn.json").read_text())
    edit(header["extra"])
    header["digest"] = validate.header_digest(header)
    (root / "compactnn.json").write_text(json.dumps(header))


def test_split_attention_is_redone_on_the_skeleton_and_its_record_checked(tmp_path):
    x = torch.randn(8, 5, 6, generator=torch.Generator().manual_seed(1))
    q = compactnn.compress(_Attend().eval(), "w8", progress=False)  # runs on int8 kernels
    compactnn.save(q, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "compactnn.json").read_text())["extra"][
        "split_attention"
    ] == ["attn"]
    skeleton = _Attend()
    fast = compactnn.load(tmp_path / "q", model=skeleton, kernels=True)
    assert type(skeleton.attn) is nn.MultiheadAttention  # copied, never changed
    assert type(fast.attn).__name__ == "SplitMultiheadAttention"
    assert fast._compactnn_kernels["simulated"] == []
    with torch.no_grad():  # the projections run on the kernels, as to_kernels runs them
        torch.testing.assert_close(fast(x), compactnn.to_kernels(q)(x), atol=0, rtol=0)
    for bad, message in (
        ("attn", r"extra\['split_attention'\].*must list module names"),
        (["inp"], "split attention 'inp' is not a plain nn.MultiheadAttention"),
        (["nowhere"], "split attention 'nowhere' is not a module of the skeleton"),
        (["attn", "attn"], r"extra\['split_attention'\].*names a module twice"),
    ):
        _edit_extra(tmp_path / "q", lambda extra, bad=bad: extra.update(split_attention=bad))
        with pytest.raises(ArtifactError, match=message):
            compactnn.load(tmp_path / "q", model=_Attend())


class _AliasedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.MultiheadAttention(8, 2, batch_first=True)
        self.b = self.a  # one attention under two names
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x, x, x)[0]
        return self.fc(self.b(h, h, h)[0])


def test_an_aliased_attention_stays_one_module_through_compress_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = _AliasedAttention().eval()
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(1))
    qmodel = compactnn.compress(model, "w8a8", calib_data=[x], progress=False)
    assert qmodel.b is qmodel.a and type(qmodel.a).__name__ == "SplitMultiheadAttention"
    assert not compactnn.info_of(qmodel)["float_layers"]
    compactnn.save(qmodel, tmp_path / "art")
    header = json.loads((tmp_path / "art" / "compactnn.json").read_text())
    assert header["extra"]["split_attention"] == ["a", "b"]
    assert not [k for k in header["layers"] if k.startswith("b.")]  # stored once
    loaded = compactnn.load(tmp_path / "art", model=_AliasedAttention())
    assert loaded.b is loaded.a
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
        # one float attention applied twice: the quantized model stays close to it
        assert (loaded(x) - model(x)).abs().max() < 0.05
