import pytest
import torch
from torch import nn

from compactnn.core.calib import as_batches
from compactnn.core.context import CompressContext
from compactnn.core.qlayers import is_quant_layer
from compactnn.engines.qat import (
    QATLayer,
    QATMethod,
    apply_qat,
    freeze_layers,
    init_quantizers,
    start_epoch,
    wrap_layers,
)
from compactnn.engines.qat_quantizers import LSQAct, LSQWeight, STEWeight
from compactnn.errors import CompactnnError
from compactnn.quant.lsq import LSQConfig


class EpochCounter(STEWeight):
    """STE weights that remember the epochs announced to them."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.epochs: list[tuple[int, int]] = []

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        self.epochs.append((epoch, epochs))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(32, 6)
    ctx = CompressContext(batches=as_batches(x), progress=False)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return model, x, ctx, targets


def test_hooks_get_layer_spec_and_config_and_raised_layers_get_lsq():
    model, _, ctx, targets = _setup()
    calls = []

    def weight_hook(layer, spec, config):
        calls.append(("w", layer, spec.bits, config))
        return EpochCounter(spec)

    def act_hook(layer, spec, config):
        calls.append(("a", layer, spec.bits, config))
        return LSQAct(spec.bits)

    config = LSQConfig.from_short(4, 4, None)
    wrap_layers(model, targets, config, ctx, QATMethod(weight_hook, act_hook))
    assert all(isinstance(model[i], QATLayer) for i in (0, 2, 4))
    # first and last layers keep 8 bits: LSQ whatever the method; the middle one is the method's
    assert isinstance(model[0].weight_quantizer, LSQWeight)
    assert isinstance(model[4].weight_quantizer, LSQWeight)
    assert calls == [("w", model[2].layer, 4, config), ("a", model[2].layer, 4, config)]
    start_epoch(model, 1, 3)
    assert model[2].weight_quantizer.epochs == [(1, 3)]


def test_freeze_replaces_every_wrapper_by_a_quantized_layer_with_the_same_output():
    model, x, ctx, targets = _setup()
    method = QATMethod(lambda layer, spec, config: STEWeight(spec))
    wrap_layers(model, targets, LSQConfig.from_short(4, 8, None), ctx, method)
    init_quantizers(model, ctx)
    model.eval()
    with torch.no_grad():
        wrapped = model(x)
    freeze_layers(model)
    assert all(is_quant_layer(model[i]) for i in (0, 2, 4))
    with torch.no_grad():
        assert torch.allclose(model(x), wrapped, atol=1e-5)


def test_one_bit_activations_need_a_block_hook():
    model, _, ctx, targets = _setup()
    method = QATMethod(lambda layer, spec, config: STEWeight(spec))
    with pytest.raises(CompactnnError, match=r"'2'.*1 bit"):
        apply_qat(model, targets, LSQConfig.from_short(2, 1, None), ctx, method)
    made = []

    def block(name, layer, wq, ctx):
        made.append(name)
        return QATLayer(layer, wq)

    model, _, ctx, targets = _setup()
    apply_qat(
        model,
        targets,
        LSQConfig.from_short(2, 1, None),
        ctx,
        QATMethod(method.weight_quantizer, block=block),
    )
    assert made == ["2"] and is_quant_layer(model[2])


def test_wrap_refuses_configs_of_other_engines():
    from compactnn.quant.rtn import RTNConfig

    model, _, ctx, targets = _setup()
    with pytest.raises(CompactnnError, match="not a training-aware"):
        wrap_layers(model, targets, RTNConfig(), ctx, QATMethod(lambda *a: None))
