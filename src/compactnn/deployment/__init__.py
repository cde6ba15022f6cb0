"""Deployment: compactnn's simulated int8 models on real integer kernels (see docs/deploy.md)."""

from compactnn.deployment.api import BACKENDS, DeployedModel, deploy
from compactnn.deployment.residual import quantize_residuals
from compactnn.lowering.verify import Verification

__all__ = ["BACKENDS", "DeployedModel", "Verification", "deploy", "quantize_residuals"]
