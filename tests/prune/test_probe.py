"""Probe Pruning: the probe, the fusion, the score and the sliced MLP against hand references."""

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import outputs, tiny_model
from compactnn.prune.probe import (
    ProbeMLP,
    ProbePruneConfig,
    channel_importance,
    fuse_states,
    kept_channels,
    probe_flops_fraction,
    probe_indices,
    stride_positions,
    top_positions,
)
from compactnn.recipe import Recipe, Step


def test_probe_selection_by_hand():
    n = torch.tensor([[1.0, 5.0, 1.5, 1.0, 0.0], [2.0, 9.0, 3.0, 1.0, 7.0]])
    # per sample, the 2 largest positions ({1, 2}, {1, 4}); position 0 replaces the earlier
    assert top_positions(n, 2).tolist() == [[0, 2], [0, 4]]
    assert top_positions(n, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert stride_positions(5, 3).tolist() == [0, 2, 4]
    batch = ProbePruneConfig(mode="batch", samples=0.5, tokens=0.4, select="residual")
    smp, pos = probe_indices(n, batch)
    # column norms 2.24, 10.30, 3.35, 1.41, 7.0 -> {1, 4} -> 0 replaces 1 -> [0, 4]
    assert pos.tolist() == [0, 4] and smp.tolist() == [1]  # row norms 1.0 vs 7.28
    smp, pos = probe_indices(n, ProbePruneConfig(tokens=0.5))  # per sample, stride
    assert smp is None and pos.tolist() == [[0, 2, 4]] * 2
    assert kept_channels(torch.tensor([0.3, 0.1, 0.9, 0.2, 0.5]), 0.4).tolist() == [0, 2, 4]
    assert kept_channels(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), 0.4).tolist() == [
        [1, 2],
        [0, 1],
    ]
    assert kept_channels(torch.tensor([1.0, 2.0]), 0.99).tolist() == [1]  # never all


def test_fusion_and_scores_by_hand():
    p = torch.tensor([[3.0, 0.0], [1.0, 2.0]])  # (P=2 positions, H=2)
    g = torch.tensor([[1.0, 4.0], [1.0, 2.0]])
    # importance-scaled: w = p / (p + g); channel 0: (1/4*1 + 3/4*3) + (1/2*1 + 1/2*1) = 3.5
    # channel 1: (1*4 + 0) + (1/2*2 + 1/2*2) = 6
    torch.testing.assert_close(fuse_states(p, g, None), torch.tensor([3.5, 6.0]))
    # fixed: 0.25 g + 0.75 p summed over positions
    torch.testing.assert_close(fuse_states(p, g, 0.25), torch.tensor([3.5, 3.0]))
    w = torch.tensor([[3.0, 0.0], [4.0, 2.0]])  # column norms 5, 2; of squares 16.64.., 4
    m = torch.tensor([4.0, 9.0])
    ppsp = torch.tensor([4.0 * (81.0 + 256.0) ** 0.5, 9.0 * 4.0])
    torch.testing.assert_close(channel_importance(w, m, "ppsp"), ppsp)
    torch.testing.assert_close(channel_importance(w, m, "wanda"), torch.tensor([10.0, 6.0]))
    assert probe_flops_fraction(ProbePruneConfig(mode="static"), 8, 128) == 0.0
    cfg = ProbePruneConfig(mode="batch", samples=0.05, tokens=0.5)  # 2 of 32 samples x 64
    assert probe_flops_fraction(cfg, 32, 128) == pytest.approx(2 * 2 * 64 / (3 * 32 * 128))


def _masked_mlp(mlp, x, keep):
    """The full MLP with the dropped hidden channels zeroed (masking, not slicing)."""
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    mask = torch.zeros(h.shape[-1])
    mask[keep] = 1.0
    return mlp.down_proj(h * mask)


def _ppsp(mlp, hp_sq, g):
    """The written formulas: importance-scaled fusion then ``m_j ||W_down[:, j]^2||``."""
    w = hp_sq / (hp_sq + g)
    m = ((1 - w) * g + w * hp_sq).sum(-2)
    return m * mlp.down_proj.weight.pow(4).sum(0).sqrt()


def _top(score, k):
    return set(score.topk(k).indices.tolist())


def test_batch_mode_equals_the_masked_full_mlp():
    torch.manual_seed(0)
    model, _ = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    hidden = mlp.down_proj.in_features
    g = torch.rand(8, hidden) + 0.1
    cfg = ProbePruneConfig(mode="batch", samples=0.5, tokens=0.25, select="residual")
    probe = ProbeMLP(mlp, g, cfg)
    x = torch.randn(4, 8, mlp.gate_proj.in_features)
    with torch.no_grad():
        out = probe(x)  # no residual caught: the input's norms rank the tokens
        keep = probe.last_kept
        assert keep.numel() == hidden - int(0.3 * hidden)
        n = x.norm(dim=-1)
        pos = n.norm(dim=0).topk(2).indices.sort().values
        pos[0] = 0
        smp = n[:, pos].norm(dim=1).topk(2).indices.sort().values
        xp = x[smp][:, pos]
        hp = mlp.act_fn(mlp.gate_proj(xp)) * mlp.up_proj(xp)
        score = _ppsp(mlp, hp.pow(2).mean(0), g[pos])
        assert set(keep.tolist()) == _top(score, keep.numel())
        torch.testing.assert_close(out, _masked_mlp(mlp, x, keep), rtol=1e-5, atol=1e-6)


def test_sample_mode_gives_each_sample_its_own_channels():
    torch.manual_seed(1)
    model, _ = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    hidden = mlp.down_proj.in_features
    g = (torch.rand(10, hidden) + 0.1) * 1e-4  # weak history: each probe decides
    probe = ProbeMLP(mlp, g, ProbePruneConfig(tokens=0.4))  # stride: positions 0, 3, 6, 9
    x = torch.randn(3, 10, mlp.gate_proj.in_features)
    with torch.no_grad():
        out = probe(x)
        keep = probe.last_kept
        assert keep.shape == (3, hidden - int(0.3 * hidden))
        assert len({tuple(k.tolist()) for k in keep}) == 3  # different windows, different sets
        pos = torch.tensor([0, 3, 6, 9])
        for b in range(3):
            hp = mlp.act_fn(mlp.gate_proj(x[b, pos])) * mlp.up_proj(x[b, pos])
            assert set(keep[b].tolist()) == _top(_ppsp(mlp, hp.pow(2), g[pos]), keep.shape[1])
            torch.testing.assert_close(
                out[b], _masked_mlp(mlp, x[b], keep[b]), rtol=1e-5, atol=1e-5
            )


def test_compress_save_load_round_trip_and_static_mode(tmp_path):
    model, calib = tiny_model("llama")
    pruned = compactnn.compress(model, "pp30", calib_data=calib, progress=False)
    mlps = [m for m in pruned.modules() if isinstance(m, ProbeMLP)]
    assert len(mlps) == 2 and not any(isinstance(m, ProbeMLP) for m in model.modules())
    assert mlps[0].hist_sq.shape[1] == mlps[0].down_proj.in_features
    compactnn.save(pruned, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a")
    for b in calib[:2]:
        assert torch.equal(outputs(loaded, b), outputs(pruned, b))
    static = compactnn.compress(model, "pp30-static", calib_data=calib, progress=False)
    kept = []
    for b in (calib[0], calib[1], {"input_ids": calib[1]["input_ids"][:1, :18]}):
        outputs(static, b)
        kept.append(static.model.layers[0].mlp.last_kept.clone())
    # static: the same channels for every sentence of a length; calib[1]'s first sentence is
    # padded after 18 tokens: it gets the channels of its 18 tokens alone
    assert kept[0].dim() == 1 and kept[1].shape == (4, kept[0].shape[0])
    assert all(torch.equal(kept[0], row) for row in kept[1][1:])
    assert torch.equal(kept[1][0], kept[2]) and not torch.equal(kept[1][0], kept[0])


def test_batch_mode_ranks_by_the_residual_stream(tmp_path):
    model, calib = tiny_model("llama")
    cfg = ProbePruneConfig(mode="batch", samples=0.5, tokens=0.5, select="residual")
    pruned = compactnn.compress(model, Recipe("x", (Step("probe", cfg),)), calib_data=calib)
    layer = pruned.model.layers[1]
    seen = []
    handle = layer.post_attention_layernorm.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].detach().clone())
    )
    b = calib[0]
    outputs(pruned, b)
    handle.remove()
    n = seen[0].norm(dim=-1)
    k = max(2, -(-n.shape[1] // 2))
    pos = n.norm(dim=0).topk(k).indices.sort().values
    if k <= 10:
        pos[0] = 0
    assert layer.mlp.last_probe[1].tolist() == pos.tolist()
    compactnn.save(pruned, tmp_path / "b")  # the hook comes back at load
    loaded = compactnn.load(tmp_path / "b")
    assert torch.equal(outputs(loaded, b), outputs(pruned, b))
    assert loaded.model.layers[1].mlp.last_probe[1].tolist() == pos.tolist()


def test_refuses_bad_inputs():
    model, calib = tiny_model("bert")
    with pytest.raises(CompactnnError, match="LLaMA-style MLPs"):
        compactnn.compress(model, "pp30", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError, match="ratio"):
        ProbePruneConfig(ratio=1.0)
    with pytest.raises(CompactnnError, match="mode"):
        ProbePruneConfig(mode="token")
    with pytest.raises(CompactnnError, match="tokens"):
        ProbePruneConfig(tokens=0.0)
