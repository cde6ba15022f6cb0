"""Channel-pruned (``ch<P>+``) search formats: parsing, bytes, sensitivity, latency credit."""

import numpy as np
import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.mixed_precision import Budget, search
from compactnn.mixed_precision.cost import layer_bytes
from compactnn.mixed_precision.formats import Format, pruned_rows
from compactnn.mixed_precision.latency import credited, latency_table
from compactnn.recipe import Recipe, Step
from tests.mixed_precision._blocks import Block


def block_model():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():  # rows of ``a`` with clearly different norms: one L1 ranking
        model.a.weight.mul_(
            torch.tensor([4.0, 0.1, 3.0, 0.2, 5.0, 0.3, 2.0, 0.4])[:, None, None, None]
        )
        model.b.weight.copy_(model.b.weight.sign() * 0.1)  # equal input columns
    return model, [torch.randn(16, 1, 6, 6) for _ in range(2)]


def test_parse_and_bytes():
    f = Format.parse("ch50+w4a8")
    assert (f.name, f.prune, f.weight.bits, f.act.bits) == ("ch50+w4a8", 0.5, 4, 8)
    with pytest.raises(CompactnnError, match="1-99"):
        Format.parse("ch0+w8a8")
    layer = nn.Conv2d(4, 8, 3)  # 8 rows of 36 weights; 4 kept: 4*36*4 bits = 72 B codes
    assert layer_bytes(layer, f) == 72 + 2 * 4 + 4 + 8 + 4 * 4  # scales, zeros, act, bias
    assert layer_bytes(layer, Format.parse("w4a8")) == 144 + 16 + 8 + 8 + 32
    w = torch.tensor([[3.0, -1.0], [0.5, 0.0], [-2.0, 2.0], [0.1, 0.1]])
    assert pruned_rows(w, f).tolist() == [1, 3]  # L1 norms 4, 0.5, 4, 0.2


def test_credited_macs_and_table():
    cred = credited([100, 200, 50], [50, 100, 50], [True, False, False], [False, True, False])
    assert cred == [-50.0, 200.0, 50.0]  # b's saving (100) moves to a
    t = latency_table({"p": 6.0, "w": 8.0}, ["p", "w"], [100, 200, 50], {"p": cred})
    np.testing.assert_allclose(t.sum(axis=0), [6.0, 8.0])  # uniform: the measured times
    np.testing.assert_allclose(t[:, 0], 6.0 * np.array(cred) / 200.0)


def test_pruned_format_only_where_uncoupled_and_sensitivity_matches_removal():
    model, calib = block_model()
    r = search(
        model,
        formats="ch50+w8a8,w8a8",
        budget=Budget(avg_bits=8),
        calib_data=calib,
        progress=False,
    )
    j = r.formats.index("ch50+w8a8")
    # only ``a`` can drop channels alone (stem and b feed the residual add; head is the output)
    allowed_pruned = [n for n, row in zip(r.layers, r.scores, strict=True) if row[j] > 0]
    assert allowed_pruned == ["a"]
    # the measured sensitivity of ch50+w8a8 on ``a`` against the real removal (float, no
    # quantization): the 8-bit rounding adds far less than removing half of the channels
    pruned = compactnn.compress(
        model,
        Recipe("p", (Format.parse("ch50+w8a8").prune_step(["a"]),)),
        calib_data=calib,
        progress=False,
    )
    assert pruned.a.weight.shape[0] == 4 and pruned.b.weight.shape[1] == 4
    with torch.no_grad():
        ref = [model(x) for x in calib]
        out = [pruned(x) for x in calib]
    err = sum(float((o - y).pow(2).sum()) for o, y in zip(out, ref, strict=True)) / sum(
        float(y.pow(2).sum()) for y in ref
    )
    s = r.scores[r.layers.index("a"), j]
    assert err > 1e-3 and s == pytest.approx(err, rel=0.05)


def test_pruned_recipe_runs_and_prunes_first():
    model, calib = block_model()
    r = search(
        model,
        formats="ch50+w8a8,w8a8",
        budget=Budget(avg_bits=7.0),  # only pruning ``a`` (288 of 1,152 conv weights) saves
        calib_data=calib,
        progress=False,
    )
    assert r.assignment["a"] == "ch50+w8a8"
    steps = r.recipe.steps
    assert steps[0].method == "channel" and steps[0].targets.names == ("a",)
    q = compactnn.compress(model, r.recipe, calib_data=calib, progress=False)
    assert q.a.weight.shape[0] == 4
    assert isinstance(steps[1], Step)


def test_layer_times_hook_each_deployed_kernel():
    from compactnn.mixed_precision.latency import deployed, layer_times

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    d = deployed(model, "w8a8", [x], x)
    times = layer_times({"w8a8": d}, ["0", "2"], x, runs=5)
    t = times["w8a8"]
    assert len(t) == 3 and all(v > 0 for v in t)
    assert t[-1] >= max(t[0], t[1])  # every run: the whole call holds each kernel
    assert layer_times({"w8a8": d}, ["0", "missing"], x, runs=2) is None
