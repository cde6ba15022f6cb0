"""How a simulated (fake-quantized) model maps onto integer operations.

``graph``: the model traced with ``torch.fx`` (quantized layers as leaves) and what each
node is; ``plan``: which layers run on int8 kernels, how they fuse, and whether each value is
held as float or as uint8 codes; ``verify``: an integer model checked against the simulation
in steps of the output scale.

Shared by :mod:`compactnn.deployment` (oneDNN lowering) and :mod:`compactnn.export.onnx` (QDQ
ONNX run by ONNX Runtime); depends only on :mod:`compactnn.core`, so imports flow one way:
``core -> lowering -> export.onnx -> deploy``.
"""

from compactnn._submodules import submodule


def __getattr__(name: str) -> object:
    """``compactnn.lowering.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
