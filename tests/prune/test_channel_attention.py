"""Channel pruning of a vision transformer: a width fixed in forward(), and the attentions'
out_proj layers, which the model never calls."""

import warnings

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.channel import untraced_reason
from tests._vit import tiny_vit


def _calib() -> torch.Tensor:
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _compress(recipe: str, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's note on class_token / pos_embedding
        return compactnn.compress(tiny_vit(), recipe, calib_data=_calib(), progress=False, **kwargs)


def test_a_width_fixed_in_forward_is_one_line_with_the_way_out():
    """torchvision's ViT reshapes to self.hidden_dim, which pruning the residual stream
    changes: the error names the line and says what to keep whole or how else to prune."""
    with pytest.raises(CompactnnError, match=r"self\.hidden_dim.*keep the layer that sets it") as e:
        _compress("ch30")
    assert "\n" not in str(e.value) and "--ignore NAME" in str(e.value) and "sp50" in str(e.value)


def test_ignoring_the_stem_prunes_the_mlps_and_names_why_out_proj_stays():
    """With the stream kept whole (its stem ignored), the reason for each attention's
    out_proj was asked of torch-pruning's graph, which has no node for a layer never
    called: a raw KeyError."""
    q = _compress("ch30", ignore=["conv_proj"])
    layers = q.encoder.layers
    assert [layers[i].mlp[0].out_features for i in range(2)] == [int(64 * (1 - 0.3))] * 2
    with torch.no_grad():
        assert q(_calib()[:2]).shape == (2, 10)
    attention = "encoder.layers.encoder_layer_0.self_attention"
    why = compactnn.info_of(q)["float_layers"][f"{attention}.out_proj"]
    assert f"nn.MultiheadAttention {attention!r}" in why
    assert "never calls it" in why


def test_untraced_reason_names_the_attention_only_for_its_out_proj():
    owners = {"attn.out_proj": "attn"}
    assert "nn.MultiheadAttention 'attn'" in untraced_reason("attn.out_proj", owners)
    assert "MultiheadAttention" not in untraced_reason("fc", owners)
