"""to_ort_nbits keeps int8 activations (accuracy_level=4) only when they keep the simulation."""

from __future__ import annotations

import warnings

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.kernels import nbits_check
from compactnn.kernels.nbits_check import drift, drifted
from tests.kernels._keywords import compressed

pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", message=".*calibration samples")


def _quantized():
    return compressed("w4-g32")


def _levels(path) -> set[int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        a.i
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }


def test_default_falls_back_to_float32_compute_when_int8_activations_drift(tmp_path):
    q, batch = _quantized()
    with pytest.warns(
        UserWarning, match=r"running accuracy_level=0 .*accuracy_level=4 to force"
    ) as caught:
        fast = compactnn.to_ort_nbits(q, batch, threads=1, path=tmp_path / "m.onnx")
    assert fast.accuracy_level == 0 and _levels(tmp_path / "m.onnx") == {0}
    # the warning points at the caller's line (a fixed stacklevel showed "sys:1")
    assert {w.filename for w in caught if "accuracy_level=0" in str(w.message)} == {__file__}
    check = fast.accuracy_check
    assert check["accuracy_level"] == 4 and "relative max difference" in check["drifted"]
    assert check["relative_max_diff"] > 1e-3  # int8 activations: about 1e-2
    assert check["level_0"]["relative_max_diff"] < 1e-5  # float32 compute: the simulation
    # a weight-only simulation has no activation quantizer for float rounding to move: the
    # int8-activation drift is not explained by it
    assert check["probe"]["relative_max_diff"] < 1e-4 and not check.get("explained")
    with torch.no_grad():
        torch.testing.assert_close(fast(**batch)[0], q(**batch)[0], rtol=1e-4, atol=1e-5)
    assert q.training is False


def test_forced_level_4_runs_unchecked():
    q, batch = _quantized()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = compactnn.to_ort_nbits(q, batch, accuracy_level=4, threads=1)
    assert fast.accuracy_level == 4 and fast.accuracy_check is None
    assert _levels(fast.path) == {4}


def test_level_4_within_tolerance_is_kept(monkeypatch):
    q, batch = _quantized()
    monkeypatch.setattr(nbits_check, "drifted", lambda measured: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = compactnn.to_ort_nbits(q, batch, threads=1)
    assert fast.accuracy_level == 4 and fast.accuracy_check["drifted"] is None


def test_drift_of_logits_and_of_hidden_states_over_real_tokens():
    ref = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    exact = drift(ref + 1e-7, ref)
    assert exact["argmax_agreement"] == 1.0 and drifted(exact) is None
    flipped = drift(torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.1, 2.0]]), ref)
    assert flipped["argmax_agreement"] == 0.5
    assert flipped["relative_max_diff"] == pytest.approx(0.55)
    assert "argmax agrees on 50% of rows" in drifted(flipped)
    # hidden states: padded tokens (mask 0) are not compared
    hidden = torch.randn(2, 3, 4)
    got = hidden.clone()
    got[1, 2] = -got[1, 2]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert drifted(drift(got, hidden, mask)) is None
    assert drift(got, hidden)["min_cosine"] < 0.99  # without a mask: one row per item
    assert drift(got, hidden)["argmax_agreement"] is None


def test_argmax_agreement_of_decoder_logits_per_real_token():
    ref = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]], [[0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]])
    got = ref.clone()
    got[0, 1] = torch.tensor([2.1, 2.0])  # a real token's argmax flips
    got[1, 2] = torch.tensor([2.0, 0.0])  # a padded one's too: not compared
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    measured = drift(got, ref, mask, logits=True)
    assert measured["argmax_agreement"] == pytest.approx(4 / 5)
    assert "argmax agrees on 80% of rows" in drifted(measured)
    assert drift(got, ref, logits=True)["argmax_agreement"] == pytest.approx(4 / 6)
    assert drift(got, ref, mask)["argmax_agreement"] is None  # hidden states: no argmax


def test_decoder_check_compares_argmax_of_token_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=120, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 120, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    q = compactnn.compress(model, "w4-g32", calib_data=[batch], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = compactnn.to_ort_nbits(q, batch, threads=1, bf16_tables=False)
    with pytest.raises(CompactnnError, match=r"no generate\(\).*compactnn.to_kernels\(qmodel\)"):
        fast.generate(input_ids=ids[:1, :5], max_new_tokens=2)
    check = fast.accuracy_check
    assert check["argmax_agreement"] is not None and 0.0 < check["argmax_agreement"] <= 1.0
    with torch.no_grad():
        ref = q(**batch).logits
    got = fast(**batch)[0] if fast.accuracy_level == 4 else None
    if got is not None:  # level 4 kept: its agreement is the session's over the 15 real tokens
        real = mask.bool()
        agree = (got[real].argmax(-1) == ref[real].argmax(-1)).double().mean().item()
        assert check["argmax_agreement"] == pytest.approx(agree)
    else:
        assert check["level_0"]["argmax_agreement"] == 1.0
