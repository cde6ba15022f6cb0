"""Deployment: compactnn's simulated int8 models on real integer kernels (see docs/deploy.md)."""

from compactnn.deploy.api import BACKENDS, DeployedModel, deploy
from compactnn.deploy.residual import quantize_residuals
from compactnn.deploy.verify import Verification

__all__ = ["BACKENDS", "DeployedModel", "Verification", "deploy", "quantize_residuals"]
