"""to_ort_nbits returns the model's own output class: a causal LM's ``out.logits`` (it was a
bare tuple, so ``out.logits`` raised AttributeError), an encoder's
``out.last_hidden_state``; ``out[0]`` is the same tensor; generate stays refused."""

import warnings

import pytest
import torch

import compactnn
from compactnn.kernels.ort_nbits import to_ort_nbits
from compactnn.kernels.ort_output import wrap_output
from compactnn.models.tiny_hf import tiny_model

pytest.importorskip("onnxruntime")


def _fast(arch: str):
    model, calib = tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
        fast = to_ort_nbits(q, calib[0], accuracy_level=0, threads=1)
    return q.eval(), fast, calib[0]


def test_causal_lm_output_has_logits():
    q, fast, batch = _fast("llama")
    with torch.no_grad():
        ref = q(**batch).logits
    out = fast(**batch)
    assert out.logits.shape == ref.shape == (*batch["input_ids"].shape, q.config.vocab_size)
    assert out[0] is out.logits  # still indexable as the tuple it was
    assert (out.logits - ref).abs().max().item() < 1e-4
    with pytest.raises(compactnn.CompactnnError, match=r"generate on compactnn\.to_kernels"):
        fast.generate(batch["input_ids"])


def test_encoder_output_has_last_hidden_state():
    q, fast, batch = _fast("bert")
    with torch.no_grad():
        ref = q(**batch).last_hidden_state
    out = fast(**batch)
    assert out[0] is out.last_hidden_state
    assert (out.last_hidden_state - ref).abs().max().item() < 1e-4


def test_without_a_form_it_is_the_tuple_it_was():
    t = torch.ones(2)
    assert wrap_output(t, None) == (t,)
