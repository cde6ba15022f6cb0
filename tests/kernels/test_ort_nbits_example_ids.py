"""to_ort_nbits refuses float token ids in its example before tracing (it raised torch's
embedding RuntimeError), with the wording of compactnn's other token checks."""

import warnings

import pytest
import torch

import compactnn
from compactnn.kernels.ort_nbits import to_ort_nbits
from compactnn.models.tiny_hf import tiny_model

pytest.importorskip("onnxruntime")


def test_float_ids_are_refused_by_name():
    model = tiny_model("llama")[0]
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(model, "w4-g32", calib_data=[batch], progress=False)
    bad = {"input_ids": ids.float(), "attention_mask": torch.ones_like(ids)}
    with pytest.raises(compactnn.CompactnnError, match="input_ids holds float32 values"):
        to_ort_nbits(q, bad, threads=1)
