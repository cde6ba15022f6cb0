import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import compactnn
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export import artifact
from compactnn.export.size import artifact_size, float_size, theoretical_size


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w3a3-mse", "w2a4"])
def test_save_load_is_bit_exact(tmp_path, recipe):
    m = cnn()
    x = torch.randn(16, 1, 8, 8)
    q = compactnn.compress(m, recipe, calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "a")
    q2 = compactnn.load(tmp_path / "a", model=cnn())
    assert torch.equal(q2(x), q(x))
    assert compactnn.info_of(q2)["recipe"] == compactnn.info_of(q)["recipe"]


def test_no_pickle_and_header_lists_formats(tmp_path):
    m = cnn()
    q = compactnn.compress(m, "w4a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    compactnn.save(q, tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names == ["compactnn.json", "model.safetensors", "recipe.yaml"]
    header = json.loads((tmp_path / "compactnn.json").read_text())
    assert header["layers"]["3"]["format"] == "uint4-asym-channel"
    assert header["layers"]["0"]["format"] == "int8-sym-channel"
    tensors = load_file(str(tmp_path / "model.safetensors"))
    # 64*16*9 4-bit codes take exactly half a byte each
    assert tensors["3.weight.packed"].numel() == 64 * 16 * 9 // 2


def test_artifact_is_smaller_and_close_to_theory_above_a_million_params(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256)
    )
    q = compactnn.compress(m, "w4-g32", progress=False)
    compactnn.save(q, tmp_path / "q")
    on_disk = artifact_size(tmp_path / "q")
    theory = theoretical_size(q)
    # hand-computed: layer 0 (first) and 4 (last) at symmetric int8 (codes + fp16 scale per
    # group of 32); layer 2 at uint4 (codes + fp16 scale + uint8 zero point per group);
    # biases in float32
    first = 1024 * 1024 + 1024 * 32 * 2
    middle = 1024 * 1024 // 2 + 1024 * 32 * 3
    last = 256 * 1024 + 256 * 32 * 2
    expected = first + middle + last + 4 * (1024 + 1024 + 256)
    assert theory == expected
    assert theory <= on_disk <= 1.05 * theory
    assert float_size(m) / on_disk > 2.5


def test_existing_artifact_needs_force(tmp_path):
    m = cnn()
    q = compactnn.compress(m, "w8a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    compactnn.save(q, tmp_path)
    with pytest.raises(CompactnnError, match="force"):
        compactnn.save(q, tmp_path)
    compactnn.save(q, tmp_path, force=True)
    compactnn.load(tmp_path, model=cnn())


def test_tampered_and_truncated_artifacts_are_named(tmp_path):
    m = cnn()
    q = compactnn.compress(m, "w8a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    compactnn.save(q, tmp_path)
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="modified"):
        compactnn.load(tmp_path, model=cnn())
    f.write_bytes(bytes(data[:-100]))
    with pytest.raises(ArtifactError, match="truncated"):
        compactnn.load(tmp_path, model=cnn())
    (tmp_path / "compactnn.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        compactnn.load(tmp_path, model=cnn())


def test_interrupted_save_leaves_no_artifact(tmp_path, monkeypatch):
    m = cnn()
    q = compactnn.compress(m, "w8a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        compactnn.save(q, tmp_path / "x")
    assert not artifact.artifact_exists(tmp_path / "x")
    assert [p for p in (tmp_path / "x").iterdir()] == []  # no temp file left behind
    with pytest.raises(ArtifactError, match="holds no compactnn artifact"):
        compactnn.load(tmp_path / "x", model=cnn())


def test_skeleton_is_not_modified_and_missing_skeleton_is_explained(tmp_path):
    m = cnn()
    q = compactnn.compress(m, "w8a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    compactnn.save(q, tmp_path)
    skel = cnn()
    compactnn.load(tmp_path, model=skel)
    assert isinstance(skel[1], nn.BatchNorm2d) and type(skel[0]) is nn.Conv2d
    with pytest.raises(ArtifactError, match="model="):
        compactnn.load(tmp_path)
