"""Block-by-block calibration on tiny random Llama, OPT, GPT-2 and BERT models."""

import warnings

import pytest
import torch

import compactnn
from compactnn.core.qlayers import QuantLinear
from compactnn.engines.sequential import block_stream, find_block_stacks, find_blocks
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import ARCHS, outputs, tiny_model

warnings.filterwarnings("ignore", message="kept in float")


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_every_architecture_beats_rtn_and_round_trips(arch, tmp_path):
    model, calib = tiny_model(arch)
    ref = torch.cat([outputs(model, b) for b in calib[:2]])
    rtn = compactnn.compress(model, "w3-g32-mse", calib_data=calib, progress=False)
    gq = compactnn.compress(model, "w3-g32-gptq", calib_data=calib, progress=False)
    _, blocks = find_blocks(gq)
    inner = [m for m in blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert inner and all(isinstance(m, QuantLinear) for m in inner)  # GPT-2's Conv1D too
    out_g = torch.cat([outputs(gq, b) for b in calib[:2]])
    assert _rel_err(out_g, ref) < _rel_err(torch.cat([outputs(rtn, b) for b in calib[:2]]), ref)
    assert "hf" in gq._compactnn["extra"]
    compactnn.save(gq, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a")  # no float model: rebuilt from the HF config
    for b in calib[:2]:
        assert torch.equal(outputs(loaded, b), outputs(gq, b))
    assert torch.equal(outputs(model, calib[0]), ref[: len(calib[0]["input_ids"])])  # untouched


def test_peak_memory_is_reported():
    model, calib = tiny_model("llama")
    q = compactnn.compress(model, "w4-g32-gptq", calib_data=calib, progress=False)
    assert q._compactnn["measured"]["peak_rss_mib"]["GPTQConfig"] > 0
    assert q._compactnn["extra"]["calibration"]["GPTQConfig"]["blocks"] == 2


def test_bad_inputs_are_named():
    model, calib = tiny_model("llama")
    with pytest.raises(CompactnnError, match="calibration data"):
        compactnn.compress(model, "w4-g32-gptq", progress=False)
    with pytest.raises(CompactnnError, match="group_size=48 does not divide"):
        compactnn.compress(model, "w4-g48-gptq", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError, match="repeated blocks"):
        compactnn.compress(torch.nn.Sequential(torch.nn.Linear(64, 64)), "w4-g32-gptq",
                           calib_data=torch.randn(8, 64), progress=False)  # fmt: skip


def _tiny_t5():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16,
        vocab_size=100,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    calib = [
        {
            "input_ids": torch.randint(4, 100, (4, 12), generator=gen),
            "decoder_input_ids": torch.randint(4, 100, (4, 8), generator=gen),
        }
        for _ in range(4)
    ]
    return tf.T5ForConditionalGeneration(config).eval(), calib


def test_encoder_decoder_stacks_are_found_in_order():
    model, _ = _tiny_t5()
    assert [p for p, _ in find_block_stacks(model)] == ["encoder.block", "decoder.block"]
    assert find_blocks(model)[0] == "encoder.block"  # the one stack a streamed run walks


def test_gptq_walks_the_decoder_of_an_encoder_decoder_model():
    """The decoder's blocks get GPTQ too (calibrated on the quantized encoder's states),
    not the round-to-nearest fallback of layers outside the blocks."""
    model, calib = _tiny_t5()
    rtn = compactnn.compress(model, "w3-g32-mse", calib_data=calib, progress=False)
    gq = compactnn.compress(model, "w3-g32-gptq", calib_data=calib, progress=False)
    record = gq._compactnn["extra"]["calibration"]["GPTQConfig"]
    assert record["blocks"] == 4
    assert record["stacks"] == {"encoder.block": {"blocks": 2}, "decoder.block": {"blocks": 2}}
    for name in (
        "decoder.block.1.layer.1.EncDecAttention.k",
        "decoder.block.0.layer.2.DenseReluDense.wo",
    ):
        q, r = gq.get_submodule(name), rtn.get_submodule(name)
        assert isinstance(q, QuantLinear)
        assert not torch.equal(q.weight_codes, r.weight_codes), name  # solved, not rounded

    def logits(m, b):
        with torch.no_grad():
            return m(**b).logits

    ref = torch.cat([logits(model, b) for b in calib])
    err_g = _rel_err(torch.cat([logits(gq, b) for b in calib]), ref)
    assert err_g < _rel_err(torch.cat([logits(rtn, b) for b in calib]), ref)


class _InMemoryStream:
    """A block stream that loads and releases nothing (the model is in memory)."""

    def resume(self, q_inps, fp_inps):
        return 0, q_inps, fp_inps

    def onload(self, index, block):
        pass

    def finish(self, index, block, q_inps, fp_inps):
        pass


def test_a_streamed_run_walks_one_stack_and_says_so():
    model, calib = _tiny_t5()
    with block_stream(_InMemoryStream()), pytest.warns(UserWarning, match="decoder.block"):
        q = compactnn.compress(model, "w4-g32-gptq", calib_data=calib, progress=False)
    assert q._compactnn["extra"]["calibration"]["GPTQConfig"]["blocks"] == 2
    assert isinstance(q.decoder.block[1].layer[2].DenseReluDense.wo, QuantLinear)  # rounded
