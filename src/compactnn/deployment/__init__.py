"""Deployment: compactnn's simulated int8 models on real integer kernels (see docs/deploy.md)."""

from compactnn._submodules import submodule
from compactnn.deployment.api import BACKENDS, DeployedModel, deploy, localize
from compactnn.deployment.float_check import float_model
from compactnn.deployment.residual import quantize_residuals
from compactnn.deployment.ship import load_deployed, save_deployed
from compactnn.lowering.verify import LayerGap, Verification

__all__ = [
    "BACKENDS",
    "DeployedModel",
    "LayerGap",
    "Verification",
    "deploy",
    "float_model",
    "load_deployed",
    "localize",
    "quantize_residuals",
    "save_deployed",
]


def __getattr__(name: str) -> object:
    """``compactnn.deployment.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
