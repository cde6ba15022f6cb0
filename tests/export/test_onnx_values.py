"""A model whose traced graph depends on its input's values is refused by the ONNX export
(export_onnx and deploy's onnxruntime backend); shape checks still export."""

import inspect
import warnings

import onnxruntime as ort
import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export.onnx import export_onnx
from compactnn.export.onnx_values import value_variants


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c(x))
        assert x.shape[1] == 1  # a shape check before: not the place named
        if h.mean() > 0.2:  # the value branch
            h = torch.relu(self.c2(h))
        return self.fc(h.mean((2, 3)))


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c(x))
        h = h / (h.max().item() + 1.0)  # the value branch: a number read from a tensor
        return self.fc(h.mean((2, 3)))


class ShapeChecks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3, "three channels"
        if x.size(0) > 1:
            x = x * 1.0
        assert (x >= 0).all()  # the negated variant fails it: skipped, the others compared
        h = torch.relu(self.c(x)).flatten(2).mean(2)
        return self.fc(h).reshape(x.size(0), -1)


class NonNegative(nn.Module):
    """The tester's model (session 29): exported on non-negative inputs, images in [0, 1]."""

    def __init__(self, check: bool = False) -> None:
        super().__init__()
        self.check = check
        self.c, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check:
            assert (x >= 0).all(), "non-negative input"  # refuses a negated variant
        h = torch.relu(self.c(x))
        if h.mean() > 0.5:  # the value branch
            h = torch.relu(self.c2(h))
        return self.fc(h.mean((2, 3)))


def _line(cls: type, text: str) -> str:
    lines, start = inspect.getsourcelines(cls.forward)
    return f"test_onnx_values.py:{start + next(i for i, s in enumerate(lines) if text in s)}"


def _compressed(model: nn.Module, calib: torch.Tensor, scale: float = -4) -> nn.Module:
    torch.manual_seed(0)
    batches = [calib, scale * calib]  # both paths calibrated
    return compactnn.compress(model.eval(), "w8a8", calib_data=batches, progress=False)


@pytest.mark.parametrize(("cls", "text"), [(Branchy, "if h.mean()"), (Scaled, "h.max().item()")])
def test_value_dependent_graph_is_refused_naming_the_line(cls, text, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(8, 1, 12, 12)
    qmodel = _compressed(cls(), x)
    path = tmp_path / "m.onnx"
    with pytest.raises(CompactnnError) as info:
        export_onnx(qmodel, path, example=x)
    message = str(info.value)
    assert "depends on the values of its input" in message and _line(cls, text) in message
    assert "torch.where" in message and "\n" not in message
    assert not path.exists()
    with pytest.raises(CompactnnError, match="depends on the values of its input"):
        compactnn.deploy(qmodel, "onnxruntime", example=x, time_float=False)


def test_the_other_branch_is_what_the_file_would_get_wrong():
    # the refusal is not a false alarm: the example and the variant take two paths
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.rand(8, 1, 12, 12)
    with torch.no_grad():
        means = [torch.relu(model.c(v)).mean().item() for v in (x, -16 * x)]
    assert (means[0] > 0.2) != (means[1] > 0.2)


def test_shape_checks_still_export_and_run(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(8, 3, 12, 12)
    qmodel = _compressed(ShapeChecks(), x, scale=2)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_onnx(qmodel, path, example=x)
    assert result.max_diff_steps <= 1.0
    # the tracer's own warnings reach the caller as before (once per place)
    assert any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    other = torch.rand(5, 3, 12, 12)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"input": other.numpy()})[0])
    with torch.no_grad():
        ref = qmodel(other)
    assert (out - ref).abs().max().item() <= (ref.max() - ref.min()).item() / 255
    deployed = compactnn.deploy(qmodel, "onnxruntime", example=x, time_float=False)
    assert (deployed(other) - ref).abs().max().item() <= (ref.max() - ref.min()).item() / 255


@pytest.mark.parametrize("check", [False, True], ids=["plain", "asserts-non-negative"])
def test_value_branch_on_non_negative_inputs_is_refused(check, tmp_path):
    # calibrated on [0, max]: the first quantizer clamps a negated example to 0, so the
    # sign flip alone kept the branch below 0.5 (graphs equal, the file was written, and
    # deployed it agreed with the simulation on 25% of argmax on the example times 5); a
    # model asserting x >= 0 refused the negated variants and was never compared
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8).abs()
    model = NonNegative(check).eval()
    qmodel = compactnn.compress(model, "w8a8", calib_data=[x, 10 * x], progress=False)
    path = tmp_path / "m.onnx"
    with pytest.raises(CompactnnError) as info:
        export_onnx(qmodel, path, example=x[:8])
    message = str(info.value)
    assert "depends on the values of its input" in message and "\n" not in message
    assert _line(NonNegative, "if h.mean() > 0.5") in message
    assert not path.exists()
    with pytest.raises(CompactnnError, match="depends on the values of its input"):
        compactnn.deploy(qmodel, "onnxruntime", example=x[:8], time_float=False)
    # not a false alarm: the example and the example times 16 take two paths
    with torch.no_grad():
        means = [torch.relu(qmodel.c(v)).mean().item() for v in (x[:8], 16 * x[:8])]
    assert means[0] < 0.5 < means[1]


def test_variants_move_magnitudes_both_ways_and_flip_the_sign():
    x, ids = torch.rand(2, 3), torch.tensor([[1, 2, 3]])
    variants = list(value_variants((x, ids)))
    scales = (16, 1 / 16, -16)
    assert all(torch.equal(v[0], s * x) for v, s in zip(variants, scales, strict=True))
    assert [v[1].tolist() for v in variants] == [[[1, 2, 3]], [[1, 2, 3]], [[3, 2, 1]]]
    # integer inputs alone: the positive rescales would repeat the example, left out
    assert [v[0].tolist() for v in value_variants((ids,))] == [[[3, 2, 1]]]
