"""core.model_input: the model inside torch.compile / DataParallel wrappers, the working copy
of a model with legacy weight_norm / spectral_norm, tied weight layers."""

import warnings

import pytest
import torch
from torch import nn

from compactnn.core.model_input import tied_groups, untied_message, unwrap_model, working_copy
from compactnn.core.qlayers import QuantLinear
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError


def _legacy(fn, module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the legacy forms
        return fn(module)


def test_unwrap_model_takes_the_module_inside_and_warns_once():
    inner = nn.Linear(3, 2)
    with pytest.warns(UserWarning) as caught:
        got = unwrap_model(nn.DataParallel(torch.compile(inner)))
    assert got is inner
    assert [str(w.message) for w in caught] == [
        "compressing the model inside nn.DataParallel inside torch.compile's wrapper "
        "(model.module._orig_mod); the result is a plain module: compile or wrap it again if "
        "you want."
    ]
    with pytest.warns(UserWarning, match=r"torch.compile's wrapper \(model._orig_mod\).*"):
        assert unwrap_model(torch.compile(inner), "deploying") is inner
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unwrap_model(inner) is inner  # not wrapped: no warning


def test_working_copy_of_legacy_weight_norm_without_a_forward():
    """deepcopy raised 'Only Tensors created explicitly by the user (graph leaves) support
    the deepcopy protocol' on a model with torch.nn.utils.weight_norm and no forward run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    _legacy(nn.utils.weight_norm, model[0])
    before = model[0].weight
    assert before.grad_fn is not None  # the state deepcopy refuses
    x = torch.randn(5, 4)
    copy = working_copy(model)
    assert model[0].weight is before  # the input keeps its own tensors and hook
    assert sorted(n for n, _ in model[0].named_parameters()) == ["bias", "weight_g", "weight_v"]
    assert sorted(n for n, _ in copy[0].named_parameters()) == ["bias", "weight"]
    assert not copy[0]._forward_pre_hooks  # folded: no hook to follow a replacing layer
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))


def test_working_copy_folds_legacy_spectral_norm_as_its_eval_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    _legacy(nn.utils.spectral_norm, model[0])
    x = torch.randn(5, 4)
    model(x)  # a training forward: weight is computed with autograd, u and v move
    copy = working_copy(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))
    assert isinstance(copy[0].weight, nn.Parameter) and not copy[0]._forward_pre_hooks


def test_working_copy_names_another_tensor_computed_with_autograd():
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].scaled = model[0].weight * 2
    with pytest.raises(CompactnnError, match=r"^model attribute '0.scaled' is a tensor computed"):
        working_copy(model)
    model[0].scaled = [model[0].weight * 2]  # not seen as an attribute: still one line
    with pytest.raises(CompactnnError, match=r"^the model could not be copied \(Only Tensors"):
        working_copy(model)


def test_working_copy_inplace_folds_the_model_itself():
    model = _legacy(nn.utils.weight_norm, nn.Linear(3, 2))
    assert working_copy(model, inplace=True) is model
    assert sorted(n for n, _ in model.named_parameters()) == ["bias", "weight"]


def _quant(layer: nn.Linear, bits: int) -> QuantLinear:
    q = QuantLinear(layer.in_features, layer.out_features, True, QuantSpec(bits=bits))
    q.load_state_dict(layer.state_dict(), strict=False)
    return q


def test_tied_layers_quantized_apart_are_named_with_their_formats():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Embedding(3, 4))
    model[1].weight = model[0].weight
    model[2].weight = model[0].weight  # tables are left to compress' own tied-head sharing
    groups = tied_groups(dict(model.named_children()))
    assert groups == [["0", "1"]]
    assert untied_message(model, groups) is None  # still one Parameter
    model[0], model[1] = _quant(model[0], 8), _quant(model[1], 4)
    message = untied_message(model, groups)
    assert message.startswith(
        "tied weights: 0 and 1 (0: int8-sym-channel, 1: int4-sym-channel; formats differ) "
        "share one weight Parameter in the float model; compress quantizes each layer on its own"
    )
    assert "first_last_bits: null" in message
    model[1] = _quant(nn.Linear(4, 4), 8)
    model[0].weight = model[1].weight  # same format, separate tensors: no format hint
    model[1].weight = nn.Parameter(model[0].weight.clone())
    same = untied_message(model, groups)
    assert "0: int8-sym-channel, 1: int8-sym-channel)" in same and "first_last" not in same
