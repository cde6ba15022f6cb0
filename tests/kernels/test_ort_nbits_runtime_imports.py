"""Running a saved MatMulNBits model needs onnxruntime alone: the ops it names come from the
file's metadata, not from the onnx package (which added 5.6 MiB to the running MiniLM w4
model's resident memory, 35.5 against 29.9 MiB)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import onnx
import pytest
import torch

import compactnn
from compactnn.kernels.ort_dynamic import OPS_KEY
from compactnn.kernels.ort_nbits import OrtNBitsModel, nbits_onnx, to_ort_nbits
from tests.kernels._keywords import Keywords

pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", message=".*calibration samples")


def _quantized():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = compactnn.compress(Keywords().eval(), "w4-g32", calib_data=[batch], progress=False)
    return q, batch


def test_a_saved_model_runs_without_importing_onnx(tmp_path):
    q, batch = _quantized()
    path = tmp_path / "m.onnx"
    to_ort_nbits(q, batch, threads=1, path=path, accuracy_level=0)
    torch.save(batch, tmp_path / "b.pt")
    code = (
        "import sys, torch; from compactnn.kernels.ort_nbits import OrtNBitsModel; "
        f"b = torch.load({str(tmp_path / 'b.pt')!r}); "
        f"m = OrtNBitsModel({str(path)!r}, list(b), threads=1); m(**b); "
        "print(m.runtime, '|', 'onnx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "onnxruntime MatMulNBits | False", out.stderr[-2000:]


def test_files_without_the_metadata_still_name_their_ops(tmp_path):
    q, batch = _quantized()
    data = nbits_onnx(q, batch, 0)[0]
    proto = onnx.load_from_string(data)
    assert [e.key for e in proto.metadata_props].count(OPS_KEY) == 1
    del proto.metadata_props[:]  # as written by an older compactnn
    old = OrtNBitsModel(proto.SerializeToString(), list(batch), threads=1)
    assert old.runtime == OrtNBitsModel(data, list(batch), threads=1).runtime
    assert old.runtime == "onnxruntime MatMulNBits"
