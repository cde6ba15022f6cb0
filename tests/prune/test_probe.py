"""Probe Pruning: the probe, the importance and the sliced MLP against hand-written references."""

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import outputs, tiny_model
from compactnn.prune.probe import (
    ProbeMLP,
    ProbePruneConfig,
    channel_importance,
    kept_channels,
    probe_rows,
)


def test_probe_rows_and_kept_channels_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [1.0, 1.0]])  # norms 5, 1, 10, 1.41
    assert probe_rows(x, 0.5).tolist() == [0, 2]
    assert probe_rows(x, 0.01).tolist() == [2]  # at least one row
    assert kept_channels(torch.tensor([0.3, 0.1, 0.9, 0.2, 0.5]), 0.4).tolist() == [0, 2, 4]
    assert kept_channels(torch.tensor([1.0, 2.0]), 0.99).tolist() == [1]  # never all


def test_importance_blends_probe_and_history():
    w = torch.tensor([[3.0, 0.0], [4.0, 2.0]])  # column norms 5, 2
    got = channel_importance(w, torch.tensor([4.0, 0.0]), torch.tensor([0.0, 16.0]), 0.25)
    # channel 0: 5 * sqrt(0.75 * 4) ; channel 1: 2 * sqrt(0.25 * 16)
    assert torch.allclose(got, torch.tensor([5 * 3.0**0.5, 4.0]))


def _mlp_reference(mlp, x, keep):
    """The full MLP with the dropped hidden channels zeroed (masking, not slicing)."""
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    mask = torch.zeros(h.shape[-1])
    mask[keep] = 1.0
    return mlp.down_proj(h * mask)


def test_probe_mlp_equals_the_masked_full_mlp():
    torch.manual_seed(0)
    model, _ = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    hidden = mlp.down_proj.in_features
    probe = ProbeMLP(mlp, torch.rand(hidden), ProbePruneConfig(ratio=0.3, probe=0.25))
    x = torch.randn(2, 8, mlp.gate_proj.in_features)
    with torch.no_grad():
        out = probe(x)
        keep = probe.last_kept
        assert keep.numel() == hidden - int(0.3 * hidden)
        # the importance recomputed by hand from the 4 largest-norm tokens of the batch
        x2d = x.reshape(-1, x.shape[-1])
        top = x2d.norm(dim=1).topk(4).indices
        hp = mlp.act_fn(mlp.gate_proj(x2d[top])) * mlp.up_proj(x2d[top])
        score = (
            mlp.down_proj.weight.norm(dim=0)
            * (0.5 * hp.pow(2).mean(0) + 0.5 * probe.hist_sq_mean).sqrt()
        )
        assert set(keep.tolist()) == set(score.topk(keep.numel()).indices.tolist())
        torch.testing.assert_close(out, _mlp_reference(mlp, x, keep), rtol=1e-5, atol=1e-6)


def test_compress_save_load_round_trip_and_static_mode(tmp_path):
    model, calib = tiny_model("llama")
    pruned = compactnn.compress(model, "pp30", calib_data=calib, progress=False)
    mlps = [m for m in pruned.modules() if isinstance(m, ProbeMLP)]
    assert len(mlps) == 2 and not any(isinstance(m, ProbeMLP) for m in model.modules())
    compactnn.save(pruned, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a")
    for b in calib[:2]:
        assert torch.equal(outputs(loaded, b), outputs(pruned, b))
    static = compactnn.compress(model, "pp30-static", calib_data=calib, progress=False)
    kept = []
    for b in calib[:2]:
        outputs(static, b)
        kept.append(static.model.layers[0].mlp.last_kept.clone())
    assert torch.equal(kept[0], kept[1])  # static: the same channels for every batch


def test_refuses_models_without_llama_mlps():
    model, calib = tiny_model("bert")
    with pytest.raises(CompactnnError, match="LLaMA-style MLPs"):
        compactnn.compress(model, "pp30", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError, match="ratio"):
        ProbePruneConfig(ratio=1.0)
