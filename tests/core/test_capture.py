"""Capture hooks see one module's input or output and stop the forward pass there."""

import pytest
import torch
from torch import nn

from compactnn.core.capture import StopForward, capture_batches, run_until_stopped, stop_after
from compactnn.core.context import CompressContext


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


def test_input_and_output_are_captured_and_later_layers_never_run():
    model = _model()
    batches = [torch.randn(3, 4), torch.randn(5, 4)]
    ctx = CompressContext(batches=batches)
    later = []
    model[2].register_forward_pre_hook(lambda _m, a: later.append(1))
    seen, outs = [], []
    capture_batches(model, model[1], ctx, lambda _m, args: seen.append(args[0]))
    capture_batches(model, model[1], ctx, lambda _m, _a, out: outs.append(out), output=True)
    assert not later  # the forward stopped at the ReLU both times
    for b, x, y in zip(batches, seen, outs, strict=True):
        torch.testing.assert_close(x, model[0](b))
        torch.testing.assert_close(y, torch.relu(model[0](b)))


def test_other_errors_propagate():
    model = _model()
    ctx = CompressContext(batches=[torch.randn(2, 4)])

    def bad(_m, _args):
        raise ValueError("not a tensor")

    with pytest.raises(ValueError, match="not a tensor"):
        capture_batches(model, model[0], ctx, bad)
    assert not model[0]._forward_pre_hooks  # the hook is removed even so


def test_stop_after_and_run_until_stopped():
    with pytest.raises(StopForward):
        stop_after(lambda *a: None)(1, 2)
    assert run_until_stopped(stop_after(lambda: None)) is True
    assert run_until_stopped(lambda x: x, 1) is False
