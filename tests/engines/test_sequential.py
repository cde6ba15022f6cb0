"""Block-by-block calibration on tiny random Llama, OPT, GPT-2, BERT and T5 models."""

import warnings

import pytest
import torch

import compactnn
from compactnn.core.qlayers import QuantLinear
from compactnn.engines import sequential
from compactnn.engines.blocks import find_blocks
from compactnn.engines.sequential import block_stream
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import ARCHS, outputs, tiny_model
from tests.engines._tiny_t5 import logits, tiny_t5

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
    assert q._compactnn["measured"]["peak_rss_mib"]["gptq"] > 0
    assert q._compactnn["extra"]["calibration"]["GPTQConfig"]["blocks"] == 2
    # the notes and the printed peak name the method as the user wrote it, not its config class
    assert "gptq: calibrated 2 blocks one at a time" in q._compactnn["notes"]


def test_bad_inputs_are_named():
    model, calib = tiny_model("llama")
    with pytest.raises(CompactnnError, match="calibration data"):
        compactnn.compress(model, "w4-g32-gptq", progress=False)
    with pytest.raises(CompactnnError, match="group_size=48 does not divide"):
        compactnn.compress(model, "w4-g48-gptq", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError, match="repeated blocks"):
        compactnn.compress(torch.nn.Sequential(torch.nn.Linear(64, 64)), "w4-g32-gptq",
                           calib_data=torch.randn(8, 64), progress=False)  # fmt: skip


def test_gptq_walks_the_decoder_of_an_encoder_decoder_model():
    """The decoder's blocks get GPTQ too (calibrated on the quantized encoder's states),
    not the round-to-nearest fallback of layers outside the blocks."""
    model, calib = tiny_t5()
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

    ref = torch.cat([logits(model, b) for b in calib])
    err_g = _rel_err(torch.cat([logits(gq, b) for b in calib]), ref)
    assert err_g < _rel_err(torch.cat([logits(rtn, b) for b in calib]), ref)


def _position_biases(model, stack, batches):
    """Per block of ``stack``: the (self-, cross-attention) position biases it is called
    with in a plain forward of ``batches`` (T5 passes them as positional args 2 and 5)."""
    seen = {i: [] for i in range(len(stack))}
    handles = [
        b.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append((a[2], a[5])))
        for i, b in enumerate(stack)
    ]
    for batch in batches:
        logits(model, batch)
    for h in handles:
        h.remove()
    return seen


def test_t5_blocks_get_the_position_bias_of_the_block_before_them(monkeypatch):
    """Only T5's first block computes the relative position bias; the blocks after it must
    be calibrated with it (as in a plain forward), not with the first block's None (with
    which they ran on the attention mask alone)."""
    model, calib = tiny_t5()
    seen = {}
    solve = sequential.quantize_block

    def recording(block, layers, specs, calls, q_inps, solve_layer):
        name = next(iter(layers.values()))[0].split(".layer.")[0]  # "encoder.block.1"
        seen[name] = [(c[0][2], c[0][5]) for c in calls]
        return solve(block, layers, specs, calls, q_inps, solve_layer)

    monkeypatch.setattr(sequential, "quantize_block", recording)
    gq = compactnn.compress(model, "w4-g32-gptq", calib_data=calib, progress=False)
    monkeypatch.undo()
    # the step quantizes the bias tables too (8 bits): the blocks are calibrated with the
    # biases of the quantized model, close to the float model's
    for stack in ("encoder", "decoder"):
        ref = _position_biases(gq, getattr(gq, stack).block, calib)
        fp = _position_biases(model, getattr(model, stack).block, calib)
        for i in range(2):
            got = seen[f"{stack}.block.{i}"]
            for (bias, cross), r, f in zip(got, ref[i], fp[i], strict=True):
                if i == 0:  # the first block computes them itself
                    assert bias is None and cross is None
                    continue
                torch.testing.assert_close(bias, r[0], rtol=0, atol=0)
                torch.testing.assert_close(bias, f[0], rtol=0, atol=2e-3)
                if stack == "decoder":  # cross-attention: no learnt bias, only the mask
                    torch.testing.assert_close(cross, r[1], rtol=0, atol=0)
                    torch.testing.assert_close(cross, f[1], rtol=0, atol=0)
    monkeypatch.setattr(sequential, "block_links", lambda *_a: {})  # as before: block 0's
    old = compactnn.compress(model, "w4-g32-gptq", calib_data=calib, progress=False)
    ref = torch.cat([logits(model, b) for b in calib])
    err = _rel_err(torch.cat([logits(gq, b) for b in calib]), ref)
    assert err <= _rel_err(torch.cat([logits(old, b) for b in calib]), ref)  # 0.0872, 0.0887


class _InMemoryStream:
    """A block stream that loads and releases nothing (the model is in memory)."""

    def resume(self, q_inps, fp_inps):
        return 0, q_inps, fp_inps

    def onload(self, index, block):
        pass

    def finish(self, index, block, q_inps, fp_inps):
        pass


def test_a_streamed_run_walks_one_stack_and_says_so():
    model, calib = tiny_t5()
    with block_stream(_InMemoryStream()), pytest.warns(UserWarning, match="decoder.block"):
        q = compactnn.compress(model, "w4-g32-gptq", calib_data=calib, progress=False)
    assert q._compactnn["extra"]["calibration"]["GPTQConfig"]["blocks"] == 2
    assert isinstance(q.decoder.block[1].layer[2].DenseReluDense.wo, QuantLinear)  # rounded
