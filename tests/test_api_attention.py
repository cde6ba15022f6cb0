"""compress on nn.MultiheadAttention: split into called q/k/v/out Linear layers and quantized
(moved from tests/test_api.py)."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qlayers import QuantLinear
from compactnn.errors import CompactnnError
from tests._rtn import rtn_int8


class AttnNet(nn.Module):
    def __init__(self, **attn) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, **attn)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.fc(self.attn(h, h, h)[0] + h)


def test_multihead_attention_projections_are_split_and_quantized(tmp_path):
    """nn.MultiheadAttention read in_proj_weight and out_proj.weight without calling a layer,
    so w8a8 kept all four projections in float; now they are called Linear layers."""
    torch.manual_seed(0)
    m, x = AttnNet().eval(), torch.randn(8, 5, 6)
    w_in, w_out = m.attn.in_proj_weight.detach().clone(), m.attn.out_proj.weight.detach().clone()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = compactnn.compress(m, "w8a8", calib_data=x, progress=False)
    assert not [w for w in rec if "MultiheadAttention" in str(w.message)]
    assert type(m.attn) is nn.MultiheadAttention  # the user's model is unchanged
    assert torch.equal(m.attn.in_proj_weight, w_in)
    info = compactnn.info_of(q)
    assert info["float_layers"] == {} and info["extra"]["split_attention"] == ["attn"]
    expected = dict(zip(("q_proj", "k_proj", "v_proj"), w_in.split(16), strict=True))
    expected["out_proj"] = w_out
    for name, w in expected.items():  # int8 codes of each float projection, per row
        layer = getattr(q.attn, name)
        assert isinstance(layer, QuantLinear) and layer.input_quantizer.calibrated
        assert torch.equal(layer.weight, rtn_int8(w))
    with torch.no_grad():
        ref = m(x)
        assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()
    compactnn.save(q, tmp_path / "q")
    skeleton = AttnNet()
    loaded = compactnn.load(tmp_path / "q", model=skeleton)
    assert type(skeleton.attn) is nn.MultiheadAttention  # the skeleton is copied
    assert type(loaded.attn).__name__ == "SplitMultiheadAttention"
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_split_projection_names_can_be_ignored_and_typos_are_refused():
    """The compressed model's names (attn.q_proj) are accepted in ignore= and targets.names,
    though the float model has no such module; a typo lists them among the close names."""
    torch.manual_seed(0)
    m, x = AttnNet().eval(), torch.randn(8, 5, 6)
    q = compactnn.compress(m, "w8a8", calib_data=x, progress=False, ignore=["attn.q_proj"])
    assert type(q.attn.q_proj) is nn.Linear and isinstance(q.attn.k_proj, QuantLinear)
    assert torch.equal(q.attn.q_proj.weight, m.attn.in_proj_weight[:16])
    assert type(m.attn) is nn.MultiheadAttention
    with pytest.raises(CompactnnError, match=r"'attn\.q_prj' matches no module.*attn\.q_proj"):
        compactnn.compress(m, "w8a8", calib_data=x, progress=False, ignore=["attn.q_prj"])
    assert type(m.attn) is nn.MultiheadAttention


def test_unsplittable_multihead_attention_out_proj_stays_float_with_its_reason(tmp_path):
    torch.manual_seed(0)
    m, x = AttnNet(add_bias_kv=True).eval(), torch.randn(8, 5, 6)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = compactnn.compress(m, "w8a8", calib_data=x, progress=False)  # was refused
    said = [str(w.message) for w in rec if "MultiheadAttention" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0]
    assert "attn.out_proj" in said[0] and "in_proj weights are parameters" in said[0]
    assert "(add_bias_kv=True)" in said[0]
    info = compactnn.info_of(q)
    assert "split_attention" not in info["extra"]
    assert list(info["float_layers"]) == ["attn.out_proj"]
    assert "MultiheadAttention attn" in info["float_layers"]["attn.out_proj"]
    assert "never calls it (not split: add_bias_kv=True)" in info["float_layers"]["attn.out_proj"]
    assert torch.equal(q.attn.out_proj.weight, m.attn.out_proj.weight)
    assert torch.equal(q.attn.in_proj_weight, m.attn.in_proj_weight)
    for name in ("inp", "fc"):  # the other layers: int8 codes of their float weights
        layer = getattr(q, name)
        assert isinstance(layer, QuantLinear) and layer.input_quantizer.calibrated
        assert torch.equal(layer.weight, rtn_int8(getattr(m, name).weight.detach()))
    compactnn.save(q, tmp_path / "q")
    loaded = compactnn.load(tmp_path / "q", model=AttnNet(add_bias_kv=True))
    assert compactnn.info_of(loaded)["float_layers"] == info["float_layers"]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def _tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero
    return vit.eval()


def test_vision_transformer_attention_is_quantized_and_reloads(tmp_path):
    """A torchvision ViT kept its q/k/v/out projections (a third of its weights) in float."""
    torch.set_num_threads(1)
    m, x = _tiny_vit(), torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = compactnn.compress(m, "w8a8", calib_data=x, progress=False)
    info = compactnn.info_of(q)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
    assert info["float_layers"] == {}
    assert info["extra"]["split_attention"] == [f"{b}.self_attention" for b in blocks]
    for b in blocks:
        ref, attn = m.get_submodule(f"{b}.self_attention"), q.get_submodule(f"{b}.self_attention")
        rows = ref.in_proj_weight.detach().split(32)
        for name, w in zip(("q_proj", "k_proj", "v_proj"), rows, strict=True):
            assert torch.equal(getattr(attn, name).weight, rtn_int8(w))
            assert getattr(attn, name).input_quantizer.calibrated
        assert torch.equal(attn.out_proj.weight, rtn_int8(ref.out_proj.weight.detach()))
    with torch.no_grad():
        ref = m(x)
        assert (q(x) - ref).abs().max() < 0.1 * ref.abs().max()
    compactnn.save(q, tmp_path / "vit")
    loaded = compactnn.load(tmp_path / "vit", model=_tiny_vit())
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_weight_only_solvers_compress_attention_blocks():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(h, h, h)[0] + h)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.layers = nn.Linear(16, 16), nn.ModuleList([Block(), Block()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers[1](self.layers[0](self.inp(x)))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration samples
        q = compactnn.compress(Net().eval(), "w4-g16-gptq", torch.randn(8, 5, 16), progress=False)
    # was "layers ['attn.out_proj'] never ran on the calibration data", then out_proj in float
    assert compactnn.info_of(q)["float_layers"] == {}
    for block in q.layers:
        projections = [getattr(block.attn, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        assert all(isinstance(layer, QuantLinear) for layer in [block.fc, *projections])
