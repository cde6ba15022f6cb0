"""Shared by the channel-pruning tests: a small conv chain and a compress without warnings."""

import warnings

import torch
from torch import nn

import compactnn


def chain():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def quiet_compress(model, recipe, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compactnn.compress(model, recipe, calib_data=x, progress=False, **kw)
