"""A quantized twin keeps the hooks and requires_grad flags of the layer it replaces."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.modules import conv1d_to_linear, set_module
from compactnn.core.qlayers import make_quant_layer
from compactnn.core.spec import QuantSpec


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(x.flatten(1))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _compress(m: nn.Module, x: torch.Tensor) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        q = compactnn.compress(m, "w8a8", calib_data=x, progress=False)
    return q, [str(w.message) for w in ws]


def test_linear_and_conv_hooks_survive_compress() -> None:
    torch.manual_seed(1)
    x = torch.randn(32, 1, 8, 8)
    m = _net()
    m.fc.register_forward_hook(lambda mod, i, o: o * 10)
    m.conv2.register_forward_pre_hook(lambda mod, args: (args[0] * 2.0,))
    with torch.no_grad():
        ref = m(x[:8])
    q, msgs = _compress(m, x)
    assert not any("hooks" in w for w in msgs), msgs
    assert len(q.fc._forward_hooks) == 1 and len(q.conv2._forward_pre_hooks) == 1
    assert type(q.fc).__name__ == "QuantLinear" and type(q.conv2).__name__ == "QuantConv2d"
    with torch.no_grad():
        out = q(x[:8])
    # before: the hooks were dropped, out was ~10x too small (relative error 0.9)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.05
    assert len(m.fc._forward_hooks) == 1  # the caller's model keeps its own


def test_handle_removes_the_hook_from_the_twin() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    handle = model[0].register_forward_hook(lambda mod, i, o: o + 100.0, with_kwargs=True)
    twin = make_quant_layer(model[0], QuantSpec(bits=8), None)
    set_module(model, "0", twin)
    assert list(twin._forward_hooks) == [handle.id]
    assert list(twin._forward_hooks_with_kwargs) == [handle.id]
    handle.remove()
    assert not twin._forward_hooks and not twin._forward_hooks_with_kwargs


def test_folded_batch_norm_with_a_hook_warns_once() -> None:
    m = _net()
    m.bn1.register_forward_hook(lambda mod, i, o: o)
    _, msgs = _compress(m, torch.randn(16, 1, 8, 8))
    dropped = [w for w in msgs if "hooks" in w]
    assert len(dropped) == 1 and "'bn1'" in dropped[0] and "dropped" in dropped[0], msgs


def test_no_warning_without_hooks() -> None:
    _, msgs = _compress(_net(), torch.randn(16, 1, 8, 8))
    assert not any("hooks" in w for w in msgs), msgs


def test_hf_conv1d_to_linear_keeps_hooks_and_flags() -> None:
    class Conv1D(nn.Module):  # GPT-2's layout: weight (in, out)
        def __init__(self) -> None:
            super().__init__()
            self.nf = 3
            self.weight = nn.Parameter(torch.randn(5, 3), requires_grad=False)
            self.bias = nn.Parameter(torch.randn(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    model = nn.Sequential(Conv1D())
    model[0].register_forward_hook(lambda mod, i, o: o * 0)
    state = torch.get_rng_state()
    conv1d_to_linear(model, ["0"])
    assert torch.equal(state, torch.get_rng_state())
    assert model(torch.randn(2, 5)).abs().max() == 0
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad


def test_requires_grad_of_bias_kept_weight_frozen() -> None:
    m = _net()
    for p in m.conv2.parameters():
        p.requires_grad_(False)
    q, _ = _compress(m, torch.randn(16, 1, 8, 8))
    # the bias keeps its flag; a quantized weight is the codes' dequantization: frozen
    assert not q.conv2.bias.requires_grad and q.fc.bias.requires_grad
    assert not q.conv2.weight.requires_grad and not q.fc.weight.requires_grad


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), nn.Conv2d(2, 4, 3), nn.Conv1d(2, 4, 3)])
def test_make_quant_layer_draws_no_random_numbers(layer: nn.Module) -> None:
    layer.bias.requires_grad_(False)
    state = torch.get_rng_state()
    q = make_quant_layer(layer, QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(q.weight, layer.weight) and torch.equal(q.bias, layer.bias)
    assert not q.bias.requires_grad


def test_load_draws_no_random_numbers(tmp_path) -> None:
    x = torch.randn(16, 1, 8, 8)
    q, _ = _compress(_net(), x)
    compactnn.save(q, tmp_path / "art")
    skeleton = Net()
    state = torch.get_rng_state()
    loaded = compactnn.load(tmp_path / "art", model=skeleton)
    assert torch.equal(state, torch.get_rng_state())
    with torch.no_grad():
        assert torch.equal(loaded(x[:4]), q(x[:4]))


def test_hooks_follow_a_wrapper_and_its_frozen_layer() -> None:
    class Wrapper(nn.Module):  # like a QAT wrapper: computes with its layer's weight
        def __init__(self, layer: nn.Linear) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.layer.weight, self.layer.bias)

    model = nn.Sequential(nn.Linear(4, 4))
    model[0].register_forward_hook(lambda mod, i, o: o * 0)
    layer = model[0]
    set_module(model, "0", Wrapper(layer))
    assert model(torch.randn(2, 4)).abs().max() == 0  # the hook runs on the wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_module(model, "0", make_quant_layer(layer, QuantSpec(bits=8), None))
    assert model(torch.randn(2, 4)).abs().max() == 0


def test_quant_embedding_twin_draws_no_random_numbers() -> None:
    from compactnn.core.qembedding import QuantEmbedding

    emb = nn.Embedding(10, 8, padding_idx=0)
    state = torch.get_rng_state()
    q = QuantEmbedding.like(emb, QuantSpec(bits=8, granularity="channel"))
    assert torch.equal(state, torch.get_rng_state())
    assert q.weight.abs().max() == 0
