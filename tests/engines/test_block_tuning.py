"""The pure pieces of block tuning match their formulas."""

import torch

from compactnn.engines.block_tuning import moved_codes, relative_error


def test_moved_codes_rounds_clamps_and_passes_gradient_straight_through():
    codes = torch.tensor([0.0, 1.0, 2.0, 3.0])
    offset = torch.tensor([0.6, -0.4, 0.9, 0.7], requires_grad=True)
    out = moved_codes(codes, offset, qmin=0, qmax=3)
    assert torch.equal(out, torch.tensor([1.0, 1.0, 3.0, 3.0]))  # 3.7 -> 4 clamps to 3
    out.sum().backward()
    # straight through everywhere, so a code on the grid's end can still be pulled back
    assert torch.equal(offset.grad, torch.ones(4))


def test_relative_error_leaves_out_masked_positions():
    target = torch.tensor([[[1.0, 0.0], [2.0, 2.0]]])  # (B=1, T=2, C=2)
    out = torch.tensor([[[1.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, False]])
    assert float(relative_error(out, target, mask)) == 1.0  # (0 + 1) / (1 + 0)
    full = float(relative_error(out, target, None))
    assert abs(full - (1 + 49 + 49) / (1 + 4 + 4)) < 1e-6


def test_stack_tuning_passes_t5_position_bias_from_block_to_block(monkeypatch):
    """In T5 only the first block computes the position bias: the end-to-end stage must run
    every later block with the bias of the block before it, as the model does, not None."""
    import compactnn
    from compactnn.engines import block_tuning
    from tests.engines._tiny_t5 import tiny_t5

    model, calib = tiny_t5(batches=2)
    seen: list = []
    tune = block_tuning.tune_stack

    def watched(blocks, *args, **kwargs):
        def pre(_m, a, kw):
            seen.append(a[2] if len(a) > 2 else kw.get("position_bias"))

        handle = blocks[1].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            return tune(blocks, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(block_tuning, "tune_stack", watched)
    compactnn.compress(model, "w2-g32-gptq_tune", calib_data=calib, progress=False)
    assert seen and all(isinstance(b, torch.Tensor) for b in seen)
