"""Attention-head and MLP-width pruning of a tiny BERT, and its save/load."""

import pytest
import torch

import compactnn
from compactnn.recipe import Recipe, Step

transformers = pytest.importorskip("transformers")


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(cfg).eval()


def _inputs():
    return {"input_ids": torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))}


def test_removing_heads_and_mlp_units(tmp_path):
    from compactnn.prune.channel import ChannelConfig

    model, batch = _bert(), _inputs()
    recipe = Recipe("heads", (Step("channel", ChannelConfig(ratio=0.5, heads=0.5)),))
    pruned = compactnn.compress(model, recipe, calib_data=batch, progress=False)
    layer = pruned.encoder.layer[0]
    assert layer.attention.self.query.out_features == 16
    assert layer.attention.self.num_attention_heads == 2
    assert layer.attention.output.dense.in_features == 16
    assert layer.intermediate.dense.out_features == 32 and layer.output.dense.in_features == 32
    out = pruned(**batch).last_hidden_state
    assert out.shape == (2, 8, 32)
    compactnn.save(pruned, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a", model=_bert())
    assert torch.equal(loaded(**batch).last_hidden_state, out)


def test_removing_a_head_with_zero_output_columns_keeps_outputs():
    from compactnn.prune.heads import prune_heads_bert

    model, batch = _bert(), _inputs()
    d = 8
    with torch.no_grad():  # head 1 of layer 0 contributes nothing: its output columns are 0
        dense = model.encoder.layer[0].attention.output.dense
        dense.weight[:, d : 2 * d] = 0
        for p in ("query", "key", "value"):
            getattr(model.encoder.layer[0].attention.self, p).weight[d : 2 * d] *= 1e-3
    ref = model(**batch).last_hidden_state
    assert prune_heads_bert(model, "encoder.layer.0.attention.self", 0.25) == 1
    assert torch.allclose(model(**batch).last_hidden_state, ref, atol=1e-5)


def test_channel_pruning_of_a_cnn_never_imports_transformers():
    """A CNN cannot be a Hugging Face model unless transformers is loaded already; importing it
    to ask cost about 1.3 s (and torchao's import-time log lines) on every ch30."""
    import subprocess
    import sys

    code = (
        "import sys, torch, compactnn\n"
        "from torch import nn\n"
        "m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),\n"
        "                  nn.Linear(8 * 4 * 4, 3)).eval()\n"
        "compactnn.compress(m, 'ch30', calib_data=torch.randn(8, 1, 8, 8), progress=False)\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(("width", "ratio", "kept"), [(128, 0.3, 90), (100, 0.29, 71), (8, 0.5, 4)])
def test_an_mlp_loses_the_floor_of_ratio_times_its_width(width, ratio, kept):
    from torch import nn

    from compactnn.prune.heads import prune_mlp

    torch.manual_seed(0)
    mlp = nn.ModuleDict({"up": nn.Linear(4, width), "down": nn.Linear(width, 4)})
    assert prune_mlp(mlp, ["up"], "down", ratio) == width - kept
    assert mlp["up"].out_features == kept == mlp["down"].in_features
