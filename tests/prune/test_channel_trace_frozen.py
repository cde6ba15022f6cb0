"""Channel pruning traces a model whose layers the user froze (``requires_grad=False``, e.g.
a stem kept fixed for fine-tuning): the trace follows autograd, so it runs with every
parameter requiring grad, and each parameter gets its own flag back afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.prune.channel_trace import grads_for_tracing, output_layers


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_a_frozen_stem_is_traced_like_a_trainable_one():
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    trainable = output_layers(_net(), CompressContext([x]), x)  # the reference
    frozen = _net()
    frozen[0][0].weight.requires_grad_(False)  # no bias: its output has no grad_fn
    before = _flags(frozen)
    assert output_layers(frozen, CompressContext([x]), x) == trainable == ["5"]
    assert _flags(frozen) == before  # the user's flags, unchanged


def test_a_model_frozen_whole_is_traced_and_stays_frozen():
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    model = _net().requires_grad_(False)
    assert output_layers(model, CompressContext([x]), x) == ["5"]
    assert not any(_flags(model).values())


def test_grads_for_tracing_gives_back_each_flag_by_name_even_for_new_tensors():
    model = _net()
    model[1].weight.requires_grad_(False)
    before = _flags(model)
    with grads_for_tracing(model):
        assert all(_flags(model).values())
        # pruning replaces a layer's tensors: the new ones get the old names' flags
        model[1].weight = nn.Parameter(model[1].weight.detach()[:4].clone())
    assert _flags(model) == before


def _pruned(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import warnings

    import compactnn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compactnn.compress(model, "ch30", calib_data=[x], progress=False)


def test_compress_prunes_a_frozen_stem_as_a_trainable_one_and_keeps_its_flag():
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    reference = _pruned(_net(), x)  # the same network, nothing frozen
    frozen = _net()
    frozen[0][0].weight.requires_grad_(False)
    before = _flags(frozen)
    pruned = _pruned(frozen, x)
    assert _flags(frozen) == before
    shapes = {n: p.shape for n, p in pruned.named_parameters()}
    assert shapes == {n: p.shape for n, p in reference.named_parameters()}
    assert shapes["0.0.weight"][0] < 8  # the stem lost channels, as the reference's did
    assert _flags(pruned) == before  # the returned model keeps the user's own flags
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), rtol=0, atol=0)


def test_compress_under_a_callers_no_grad_prunes_as_without():
    """A notebook cell under ``torch.no_grad()`` hid the graph the trace follows: a raw
    torch-pruning assertion with a site-packages path."""
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    reference = _pruned(_net(), x)
    with torch.no_grad():
        pruned = _pruned(_net(), x)
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in reference.parameters()]
    with torch.no_grad():
        assert torch.equal(pruned(x), reference(x))


def test_compress_under_inference_mode_is_refused_in_one_line():
    """Its tensors never record a graph: refused naming inference_mode, not the forward."""
    from compactnn.errors import CompactnnError

    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), pytest.raises(CompactnnError, match="inference_mode") as info:
        _pruned(_net(), x)
    assert "\n" not in str(info.value) and "forward" not in str(info.value)
