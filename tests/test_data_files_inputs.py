"""What data_files.py says of a --weights/--data file that is a pickle, and of integer
inputs for a model that computes in floating point (read through ``resolve_data``)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compactnn.data_files import check_float_inputs, read_tensors, takes_token_ids
from compactnn.errors import CompactnnError


def test_a_pickled_torch_file_is_named_as_such_and_never_unpickled(tmp_path, monkeypatch):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "net.pt")  # zip archive
    (tmp_path / "old.pt").write_bytes(pickle.dumps({"w": 1}, protocol=2))  # bare pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled a file it was asked to read as safetensors")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    for name, kind in [("net.pt", "(torch.save's zip archive)"), ("old.pt", "(a bare pickle)")]:
        with pytest.raises(CompactnnError) as info:
            read_tensors(tmp_path / name)
        message = str(info.value)
        assert f"looks like a pickled torch file {kind}" in message
        assert "safetensors.torch.save_file(model.state_dict(), 'net.safetensors')" in message
        assert "\n" not in message


def test_other_damage_keeps_the_safetensors_reason(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(CompactnnError, match="is not a readable safetensors file"):
        read_tensors(tmp_path / "x.safetensors")


def conv_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_integer_images_for_a_float_model_are_refused_with_the_cast(dtype):
    images = torch.ones(4, 1, 8, 8, dtype=dtype)
    with pytest.raises(CompactnnError) as info:
        check_float_inputs(conv_model(), images, "--data int.npy")
    message = str(info.value)
    assert message.startswith(f"--data int.npy holds {str(dtype)[6:]} values")
    assert "first layer '0' is a Conv2d" in message and "cast them to float32" in message
    with pytest.raises(CompactnnError, match=r"--data xy.safetensors's 'x' holds"):
        check_float_inputs(conv_model(), {"x": images}, "--data xy.safetensors")


def test_token_ids_float_images_and_other_models_pass():
    ids = torch.randint(0, 10, (4, 6))
    lm = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    assert takes_token_ids(lm) and not takes_token_ids(conv_model())
    check_float_inputs(lm, ids, "--data ids.npy")
    check_float_inputs(lm, {"input_ids": ids}, "--data ids.safetensors")
    check_float_inputs(conv_model(), torch.ones(4, 1, 8, 8), "--data f.npy")
    check_float_inputs(nn.Sequential(nn.ReLU()), ids, "--data ids.npy")  # no weights: unknown


def test_compress_refuses_int64_images_in_one_line(tmp_path, monkeypatch, capsys):
    from compactnn.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "convnet.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), "
        "nn.Flatten(), nn.Linear(144, 2))\n"
    )
    import convnet

    save_file(convnet.build().state_dict(), "w.safetensors")
    np.save("int.npy", np.ones((8, 1, 8, 8), dtype=np.int64))
    args = ["compress", "convnet:build", "--weights", "w.safetensors", "-r", "w8a8"]
    assert main([*args, "--data", "int.npy", "--out", "art", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data int.npy holds int64 values, and Sequential reads")
    assert len(err.splitlines()) == 1 and "expected scalar type" not in err
