import torch

from compactnn.core.fold import find_conv_bn_pairs
from compactnn.data import load_digits8
from compactnn.models.digits_resnet import DigitsResNet, build_digits_resnet
from compactnn.models.fit import FitConfig


def test_architecture_is_a_narrow_resnet_with_foldable_bns():
    model = DigitsResNet().eval()
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) < 25_000
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    pairs = find_conv_bn_pairs(model)
    assert len(convs) == 9 and len(pairs) == 9  # every conv (shortcuts too) has its BN


def test_residual_path_is_used():
    model = DigitsResNet().eval()
    block = model.stages[0]
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.nn.init.zeros_(block.bn2.weight)
        torch.nn.init.zeros_(block.bn2.bias)
        # residual branch silenced: the block is ReLU(identity)
        assert torch.equal(block(x), torch.relu(x))


def test_tiny_build_reference_fields(cache_root):
    ref = build_digits_resnet(progress=False, fit=FitConfig(epochs=1, limit=128))
    split = load_digits8()
    assert ref.name == "digits-resnet" and ref.metric == "top1" and ref.kind == "cnn"
    assert torch.equal(torch.cat(ref.calib), split.x_train[:512])
    with torch.no_grad():
        expected = (ref.model(split.x_test).argmax(1) == split.y_test).double().mean() * 100
    assert abs(ref.evaluate(ref.model) - float(expected)) < 1e-9
    assert len(list(cache_root.glob("digits-resnet-*.safetensors"))) == 1
