"""compactnn.report.sources and report's input checks: refusals that name the real problem."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compactnn
from compactnn.commands.report import check_input_size, read_labelled
from compactnn.errors import CompactnnError
from compactnn.report.sources import check_artifacts, check_skeleton, refuse_changed_weights
from tests.report._nets import X, cnn

DIGEST0, DIGEST1 = "a" * 64, "b" * 64


def _artifact(path, model: nn.Module, source: dict | None) -> str:
    q = compactnn.compress(model, "w8a8", calib_data=X, progress=False)
    if source is not None:
        q._compactnn.setdefault("extra", {})["source"] = source
    compactnn.save(q, path)
    return str(path)


def _factory(weights: str, digest: str) -> dict:
    return {"kind": "factory", "model": "net:build", "weights": f"/somewhere/{weights}",
            "weights_sha256": digest}  # fmt: skip


def test_artifacts_of_other_weights_name_each_weights_file_and_digest(tmp_path):
    a = _artifact(tmp_path / "a", cnn(), _factory("w0.safetensors", DIGEST0))
    b = _artifact(tmp_path / "b", cnn(), _factory("w1.safetensors", DIGEST1))
    with pytest.raises(CompactnnError) as info:
        check_artifacts([a, b])
    msg = str(info.value)
    assert "different float models" in msg and "\n" not in msg
    assert (
        f"{a!r} from 'net:build' with weights 'w0.safetensors' (SHA-256 aaaaaaaaaaaaaaaa...)" in msg
    )
    assert (
        f"{b!r} from 'net:build' with weights 'w1.safetensors' (SHA-256 bbbbbbbbbbbbbbbb...)" in msg
    )


def test_artifacts_of_other_classes_name_both_classes(tmp_path):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(x.flatten(1))

    a = _artifact(tmp_path / "a", cnn(), {"kind": "reference", "model": "digits-resnet"})
    b = _artifact(tmp_path / "b", Other().eval(), None)  # records no source: still refused
    with pytest.raises(CompactnnError) as info:
        check_artifacts([a, b])
    assert str(info.value) == (
        f"the artifacts need different float models ({a!r}: Sequential; {b!r}: Other); one "
        "report takes one --model: report them apart."
    )


def test_the_same_artifact_twice_is_refused(tmp_path):
    a = _artifact(tmp_path / "a", cnn(), None)
    with pytest.raises(CompactnnError, match="is given twice") as info:
        check_artifacts([a, str(tmp_path / "." / "a")])
    assert "pass each artifact once" in str(info.value)


def test_paths_that_are_no_artifact_say_why(tmp_path):
    with pytest.raises(CompactnnError, match=r"'nothing-here' does not exist; pass directories"):
        check_artifacts(["nothing-here"])
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CompactnnError, match="is a file, not an artifact directory"):
        check_artifacts([str(tmp_path / "f.txt")])
    with pytest.raises(CompactnnError, match=r"no compactnn\.json"):
        check_artifacts([str(tmp_path)])
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "compactnn.json").write_text("{}")
    with pytest.raises(CompactnnError) as info:
        check_artifacts([str(fake)])
    assert "is not a compactnn header; pass directories" in str(info.value)
    assert "no compactnn.json" not in str(info.value)


def test_a_float_model_of_another_class_names_the_recorded_source():
    header = {"model_class": "compactnn.models.digits_resnet.DigitsResNet",
              "extra": {"source": {"kind": "reference", "model": "digits-resnet"}}}  # fmt: skip
    with pytest.raises(CompactnnError) as info:
        check_skeleton("art", header, nn.Linear(2, 2), "--model minilm")
    assert str(info.value) == (
        "artifact 'art' holds a DigitsResNet (made from 'digits-resnet'), but --model minilm "
        "builds a Linear: pass --model digits-resnet."
    )
    factory = {"model_class": "torch.nn.modules.container.Sequential",
               "extra": {"source": _factory("w0.safetensors", DIGEST0)}}  # fmt: skip
    with pytest.raises(CompactnnError, match="pass --model net:build --weights FILE"):
        check_skeleton("art", factory, nn.Linear(2, 2), "--model digits-resnet")
    check_skeleton("art", factory, nn.Sequential(), "--model net:build")  # same class: fine


def test_changed_weights_become_a_refusal_naming_both_files():
    header = {"extra": {"source": _factory("w0.safetensors", DIGEST0)}}

    def build():
        warnings.warn(
            "'w1.safetensors' (SHA-256 cccccccccccccccc...) is not the file this artifact was "
            "made from (SHA-256 aaaaaaaaaaaaaaaa...); results may differ from the original.",
            stacklevel=1,
        )
        return 1

    with pytest.raises(CompactnnError) as info:
        refuse_changed_weights(build, header, "Pass the right ones.")
    assert str(info.value) == (
        "'w1.safetensors' (SHA-256 cccccccccccccccc...) is not the file this artifact was made "
        "from ('net:build' with weights 'w0.safetensors' (SHA-256 aaaaaaaaaaaaaaaa...)). "
        "Pass the right ones."
    )


def test_inputs_of_another_size_than_the_reference_takes_are_refused():
    loaded = SimpleNamespace(reference=object(), example=torch.zeros(2, 1, 28, 28),
                             source="mnist-cnn")  # fmt: skip
    data = (torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(CompactnnError, match=r"\(8x8 given, 28x28 expected\)"):
        check_input_size("digits", loaded, data)
    check_input_size("mnist", loaded, (torch.zeros(5, 1, 28, 28), data[1]))  # the right size
    factory = SimpleNamespace(reference=None, example=None, source="net:build")
    check_input_size("digits", factory, data)  # no recorded size: nothing to compare


def test_a_split_file_says_which_split_is_scored(tmp_path, capsys):
    path = str(tmp_path / "split.safetensors")
    y = torch.zeros(4, dtype=torch.long)
    save_file({"x_train": torch.zeros(4, 3), "y_train": y, "x_test": torch.ones(4, 3),
               "y_test": y.clone()}, path)  # fmt: skip
    tensors = read_labelled(path)
    assert set(tensors) == {"x_train", "y_train", "x_test", "y_test"}
    assert "holds x_train/y_train and x_test/y_test: using x_test/y_test" in capsys.readouterr().err


def test_a_reports_split_data_notes_the_split_scored(tmp_path):
    from compactnn.report import build_report

    a = _artifact(tmp_path / "a", cnn(), None)
    y = torch.arange(16) % 3
    data = {"x_train": X[:16], "y_train": y, "x_test": X[16:], "y_test": y.clone()}
    results = build_report([a], model=cnn(), data=data, out=tmp_path / "r", runs=1,
                           progress=False, quick=True)  # fmt: skip
    note = "using x_test/y_test (the held-out split; x_train/y_train not used)"
    assert any(note in n for n in results["rows"][0]["notes"])
    assert note in (tmp_path / "r" / "report.md").read_text()
    assert results["samples"] == 16
