"""Block stacks, the first block's calls and the inputs a block takes from the one before."""

import torch

from compactnn.core.context import CompressContext
from compactnn.engines.blocks import (
    block_links,
    capture_block_inputs,
    find_block_stacks,
    find_blocks,
    linked_call,
)
from compactnn.models.tiny_hf import tiny_model
from tests.engines._tiny_t5 import tiny_t5


def test_encoder_decoder_stacks_are_found_in_order():
    model, _ = tiny_t5()
    assert [p for p, _ in find_block_stacks(model)] == ["encoder.block", "decoder.block"]
    assert find_blocks(model)[0] == "encoder.block"  # the one stack a streamed run walks


def test_t5_blocks_take_their_position_biases_from_the_block_before():
    model, calib = tiny_t5(batches=2)
    ctx = CompressContext(batches=calib)
    # T5Block(hidden, mask, position_bias, enc_hidden, enc_mask, enc_dec_position_bias)
    # returns (hidden, position_bias, enc_dec_position_bias)
    assert block_links(model, model.encoder.block, ctx) == {("arg", 2): 1}
    assert block_links(model, model.decoder.block, ctx) == {("arg", 2): 1, ("arg", 5): 2}
    calls = capture_block_inputs(model, model.encoder.block[0], ctx)
    assert calls[0][0][2] is None  # the first block computes its own
    with torch.no_grad():
        out = model.encoder.block[0](*calls[0][0], **calls[0][1])
    args, kwargs = linked_call(calls[0], out, {("arg", 2): 1})
    assert args[2] is not None and torch.equal(args[2], out[1])
    assert args[0] is calls[0][0][0] and kwargs == calls[0][1]  # the rest: block 0's call


def test_blocks_that_share_their_inputs_have_no_links():
    for arch in ("llama", "gpt2"):
        model, calib = tiny_model(arch)
        _, blocks = find_blocks(model)
        ctx = CompressContext(batches=calib[:1])
        assert block_links(model, blocks, ctx) == {}
        calls = capture_block_inputs(model, blocks[0], ctx)
        assert linked_call(calls[0], None, {}) is calls[0]  # unchanged, as before
