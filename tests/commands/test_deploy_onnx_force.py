"""``compactnn deploy --onnx FILE --force`` replaces an earlier ONNX export only, refused before any
work otherwise (as ``compactnn export --force``)."""

from __future__ import annotations

import hashlib

import pytest

from compactnn import cli

pytest.importorskip("onnx")


def test_force_refuses_a_checkpoint_before_any_work(tmp_path, capsys, monkeypatch):
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt.safetensors"
    save_file({"w": torch.ones(3)}, str(ckpt))
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    import compactnn

    def no_work(*args, **kwargs):
        raise AssertionError("compressed before refusing --onnx")

    monkeypatch.setattr(compactnn, "compress", no_work)
    status = cli.main(["deploy", "mnist-cnn", "--onnx", str(ckpt), "--force", "--quick"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: --onnx") and "not an ONNX file" in err and err.count("\n") == 1
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before
