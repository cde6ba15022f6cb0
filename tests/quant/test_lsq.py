from torch import nn

from compactnn import registry
from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATMethod
from compactnn.engines.qat_quantizers import LSQAct, LSQWeight
from compactnn.quant.lsq import LSQConfig


def test_lsq_plugs_learned_steps_into_the_engine():
    method = registry.method_for_config(LSQConfig()).handler
    assert isinstance(method, QATMethod) and method.block is None
    layer, spec = nn.Linear(4, 3), QuantSpec(bits=2, symmetric=True)
    wq = method.weight_quantizer(layer, spec, LSQConfig())
    assert isinstance(wq, LSQWeight) and wq.spec.bits == 2
    assert isinstance(method.act_quantizer(layer, QuantSpec(bits=2), LSQConfig()), LSQAct)
