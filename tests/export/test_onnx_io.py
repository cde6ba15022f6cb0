"""ONNX inputs and outputs of the QDQ export: a dict example passed as keywords, named by
its keys; positional inputs named after forward's parameters; outputs named by a dict's
keys (a tuple's output_0, ...), each with a dynamic batch axis."""

import onnx
import onnxruntime as ort
import torch
from torch import nn

import compactnn
from compactnn.export.onnx import export_onnx, to_onnx_bytes
from compactnn.export.onnx_io import input_names, output_names


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1)
        self.c, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, img: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        z = torch.cat([torch.relu(self.a(img)), torch.relu(self.b(aux))], 1)
        return self.fc(torch.relu(self.c(z)).mean((2, 3)))


class KeywordOnly(TwoInputs):
    def forward(self, *, img: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return super().forward(img, aux)


class Heads(nn.Module):
    def __init__(self, as_dict: bool = True) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.c, self.fc, self.aux = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 10), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict | tuple:
        h = torch.relu(self.c(x + y)).mean((2, 3))
        out = {"logits": self.fc(h), "aux": self.aux(h)}
        return out if self.as_dict else tuple(out.values())


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    return {"img": torch.rand(n, 1, 12, 12), "aux": torch.rand(n, 1, 12, 12)}


def _compress(model: nn.Module, calib: object) -> nn.Module:
    torch.manual_seed(0)
    return compactnn.compress(model.eval(), "w8a8", calib_data=[calib], progress=False)


def _io(proto: onnx.ModelProto) -> tuple[list, list]:
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    graph = proto.graph
    return [(i.name, dims(i)) for i in graph.input], [(o.name, dims(o)) for o in graph.output]


def test_dict_example_exports_with_its_names_and_runs(tmp_path):
    torch.manual_seed(0)
    example = _batch()
    qmodel = _compress(TwoInputs(), example)
    path = tmp_path / "two.onnx"
    # keys in another order than forward's: inputs follow forward, named by the keys
    result = export_onnx(qmodel, path, example={"aux": example["aux"], "img": example["img"]})
    assert result.max_diff_steps <= 1.0
    inputs, outputs = _io(onnx.load(str(path)))
    assert inputs == [("img", ["batch", 1, 12, 12]), ("aux", ["batch", 1, 12, 12])]
    assert outputs == [("output", ["batch", 10])]
    other = _batch(5)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in other.items()})[0])
    with torch.no_grad():
        ref = qmodel(**other)
    step = (ref.max() - ref.min()).item() / 255
    assert (out - ref).abs().max().item() <= step
    deployed = compactnn.deploy(qmodel, "onnxruntime", example=example, time_float=False)
    assert (deployed(**other) - out).abs().max().item() <= step


def test_keyword_only_inputs_are_passed_by_name():
    torch.manual_seed(0)
    example = _batch()
    qmodel = _compress(KeywordOnly(), example)
    data, _ = to_onnx_bytes(qmodel, example)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["img", "aux"]
    out = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in example.items()})[0])
    with torch.no_grad():
        ref = qmodel(**example)
    assert (out - ref).abs().max().item() <= (ref.max() - ref.min()).item() / 255


def test_positional_inputs_and_dict_outputs_are_named():
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 12, 12), torch.rand(8, 1, 12, 12)
    qmodel = _compress(Heads(), (x, y))
    inputs, outputs = _io(onnx.load_from_string(to_onnx_bytes(qmodel, (x, y))[0]))
    assert [n for n, _ in inputs] == ["x", "y"]
    assert outputs == [("logits", ["batch", 10]), ("aux", ["batch", 3])]
    qmodel.as_dict = False
    inputs, outputs = _io(onnx.load_from_string(to_onnx_bytes(qmodel, (x, y))[0]))
    assert outputs == [("output_0", ["batch", 10]), ("output_1", ["batch", 3])]


def test_single_input_keeps_its_names(tmp_path):
    x = torch.zeros(2, 3)
    assert input_names(nn.Linear(3, 4), x) == ((x,), ["input"], False)
    assert output_names(x, ["input"]) == ["output"]
    # a nested output, a name an input has, a leaf that is not a tensor
    assert output_names({"f": (x, x)}, []) == ["f.0", "f.1"]
    assert output_names({"x": x, "y": x}, ["x"]) == ["output_0", "output_1"]
    assert output_names((x, 3), []) is None
