"""A tiny torchvision ViT (two encoder layers, two heads, width 32) for attention tests."""

import torch
from torch import nn


def tiny_vit() -> nn.Module:
    """Seeded, in eval mode; its head drawn at random (torchvision starts it at zero, which
    would make every output 0 and every comparison of outputs vacuous)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip
    nn.init.normal_(vit.heads.head.weight, std=0.2)
    return vit.eval()
