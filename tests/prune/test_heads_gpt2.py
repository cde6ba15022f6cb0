"""Channel pruning of GPT-2's MLP (c_fc -> c_proj), and of transformers it cannot prune."""

import copy

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe, Step

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    cfg.bos_token_id = cfg.eos_token_id = None
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ids():
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))


def _masked_reference(dense, pruned):
    """The dense GPT-2 with the MLP units pruning removed zeroed (c_proj input rows)."""
    ref = copy.deepcopy(dense)
    for i, block in enumerate(ref.transformer.h):
        fc = block.mlp.c_fc.weight.detach().T  # Conv1D (in, out) -> (units, in)
        kept = pruned.transformer.h[i].mlp.c_fc.weight.detach()
        keep = [(fc == row).all(1).nonzero().item() for row in kept]
        assert len(keep) == fc.shape[0] // 2
        drop = torch.ones(fc.shape[0], dtype=torch.bool)
        drop[keep] = False
        with torch.no_grad():
            block.mlp.c_proj.weight[drop] = 0  # Conv1D c_proj: (units, out)
    return ref


def test_ch50_removes_half_of_each_gpt2_mlp_exactly_as_masking_them(tmp_path):
    dense, ids = _gpt2(), _ids()
    pruned = compactnn.compress(copy.deepcopy(dense), "ch50", calib_data=ids, progress=False)
    for block in pruned.transformer.h:
        assert block.mlp.c_fc.out_features == 64 and block.mlp.c_proj.in_features == 64
    with torch.no_grad():
        y = pruned(input_ids=ids).logits
        y_ref = _masked_reference(dense, pruned)(input_ids=ids).logits
        y_dense = dense(input_ids=ids).logits
    assert (y - y_dense).abs().max() > 1e-2  # something was removed
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    compactnn.save(pruned, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(compactnn.load(tmp_path / "a")(input_ids=ids).logits, y)
    # c_proj lost inputs, not outputs: compressed by its shape, not "not targeted"
    reasons = compactnn.info_of(pruned)["float_layers"]
    assert reasons["transformer.h.0.mlp.c_proj"] == (
        "pruned (64 of 128 input channels removed), weights in float"
    )


def test_channel_pruning_refuses_a_transformer_it_finds_nothing_to_prune_in():
    from compactnn.prune.heads import prune_transformer

    model = _gpt2()  # its Conv1D MLP not turned into Linear: not prunable
    config = type("C", (), {"ratio": 0.5, "heads": 0.0})()
    targets = dict(model.named_modules())
    with pytest.raises(CompactnnError, match=r"found nothing to remove in GPT2LMHeadModel.*sp50"):
        prune_transformer(model, targets, config, ctx=None)


def test_heads_on_a_llama_warns_that_no_heads_were_removed():
    from compactnn.prune.channel import ChannelConfig

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    recipe = Recipe("heads", (Step("channel", ChannelConfig(ratio=0.5, heads=0.5)),))
    with pytest.warns(UserWarning, match=r"heads=0.5 removed no attention heads: LlamaForCausalLM"):
        pruned = compactnn.compress(model, recipe, calib_data=_ids(), progress=False)
    assert pruned.model.layers[0].mlp.down_proj.in_features == 32
