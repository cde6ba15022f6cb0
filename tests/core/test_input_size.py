"""The image size a convolutional model takes, named when the inputs have another one
(``core/input_size.py``; tester session 33: "mat1 and mat2 shapes cannot be multiplied
(16x9216 and 16384x10). Pass float32 values of shape (N, C, H, W) with C=3" for 48x48 images
of a net that takes 64x64 only: the data already had C=3 and the size was never named)."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.calib import expected_inputs
from compactnn.core.input_size import size_hint
from compactnn.errors import CompactnnError


class Tiny(nn.Module):
    """The tester's net: two convolutions (the second of stride 2), flatten, a Linear that
    takes 16 x 32 x 32 features, so 64x64 images only."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 32 * 32, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.fc(x.flatten(1))


WANT = "(N, 3, 64, 64) (Linear 'fc' takes 16384 features; 48x48 inputs give it 9216)"


def test_compress_names_the_image_size_the_linear_after_the_convolutions_takes():
    torch.manual_seed(0)
    with pytest.raises(CompactnnError) as caught:
        compactnn.compress(Tiny(), "w8a8", calib_data=torch.randn(16, 3, 48, 48), progress=False)
    text = str(caught.value)
    assert "mat1 and mat2 shapes cannot be multiplied (16x9216 and 16384x10)" in text
    assert text.endswith(f"Expected input: {WANT}.") and "\n" not in text


def test_expected_inputs_names_the_size_given_the_refused_inputs():
    """``compactnn eval`` / ``deploy`` build their "Pass ..." from expected_inputs."""
    model = Tiny()
    assert (
        expected_inputs(model, None, torch.randn(4, 3, 48, 48)) == f"float32 values of shape {WANT}"
    )
    # without the inputs, or with an example input, as before
    assert expected_inputs(model, None) == (
        "float32 values of shape (N, C, H, W) with C=3 (first layer 'c1')"
    )


@pytest.mark.parametrize(("h", "w"), [(48, 60), (3, 3), (100, 100), (1, 1)])
def test_a_size_that_works_is_found_from_smaller_larger_and_oblong_inputs(h, w):
    hint = size_hint(Tiny(), torch.randn(2, 3, h, w))
    assert hint is not None and hint.startswith("(N, 3, 64, 64) ")
    torch.manual_seed(0)
    assert Tiny()(torch.zeros(1, 3, 64, 64)).shape == (1, 10)  # the size named works


def test_no_size_is_named_for_a_channel_fault_a_size_that_works_or_an_adaptive_pool():
    model = Tiny()
    assert size_hint(model, torch.randn(2, 1, 48, 48)) is None  # the channel message stays
    assert size_hint(model, torch.randn(2, 3, 64, 64)) is None
    pooled = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    assert size_hint(pooled, torch.randn(2, 3, 48, 48)) is None
    assert size_hint(nn.Linear(4, 2), torch.randn(2, 3)) is None


def test_a_size_no_square_or_scaled_image_reaches_is_described_not_guessed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=3), nn.Flatten(), nn.Linear(4 * 5 * 7, 2))
    assert size_hint(net, torch.randn(2, 3, 9, 9)) == (
        "(N, 3, H, W) sized for Linear '2' (it takes 140 features; 9x9 inputs give it 36)"
    )


def test_the_probes_leave_training_mode_and_batch_norm_statistics_alone():
    model = Tiny().train()
    before = model.b1.running_mean.clone(), int(model.b1.num_batches_tracked)
    assert size_hint(model, torch.randn(2, 3, 48, 48)) is not None
    assert model.training and model.b1.training
    assert torch.equal(model.b1.running_mean, before[0])
    assert int(model.b1.num_batches_tracked) == before[1]
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_a_compressed_model_is_read_the_same_way_and_its_outputs_stay_the_same():
    """deploy's refusal of an example (``deployment/refusals.py``) describes the compressed
    model: its QuantLinear is a Linear, and the probes leave its quantizers' ranges alone."""
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 64, 64)
    qmodel = compactnn.compress(Tiny().eval(), "w8a8", calib_data=calib, progress=False)
    before = qmodel(calib[:2])
    assert size_hint(qmodel, torch.randn(2, 3, 48, 48)) == WANT
    assert torch.equal(qmodel(calib[:2]), before)
