import json

import numpy as np
import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export.size import theoretical_size
from compactnn.mixed_precision import Budget, search
from compactnn.mixed_precision.api import uniform_choice
from compactnn.recipe import Recipe
from tests._vit import tiny_vit

FORMATS = ["w2a8", "w4a8", "w8a8"]


def tiny_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    ).eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    return model, [torch.randn(16, 1, 6, 6) for _ in range(2)]


def test_budget_met_and_recipe_runs_unchanged(tmp_path):
    model, calib = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = search(
        model,
        formats=FORMATS,
        budget=Budget(avg_bits=4),
        calib_data=calib,
        progress=False,
        cache_dir=tmp_path,
    )
    assert r.layers == ["0", "3", "6"] and set(r.assignment.values()) <= set(FORMATS)
    weights = [8 * 9, 8 * 8 * 9, 8 * 36 * 5]
    bits = sum(n * int(r.assignment[k][1]) for n, k in zip(weights, r.layers, strict=True))
    assert bits <= 4 * sum(weights)
    assert r.cost["avg_bits"] == pytest.approx(bits / sum(weights))  # what the budget bounds
    recipe = Recipe.from_yaml(r.save(tmp_path).joinpath("recipe.yaml").read_text())
    q = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    formats = compactnn.api.info_of(q)  # noqa: F841  (metadata is present)
    for name, fmt in r.assignment.items():
        assert q.get_submodule(name).weight_spec.bits == int(fmt[1])
    # exact bytes: the cost model's total plus the float tensors outside the searched layers
    assert theoretical_size(q) == r.cost["bytes"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert (tmp_path / "search.json").is_file() and (tmp_path / "sensitivity.json").is_file()
    saved = json.loads((tmp_path / "search.json").read_text())
    assert r.budget == saved["budget"] == {"avg_bits": 4}  # only the limits given


def test_first_last_rule_is_a_constraint():
    model, calib = tiny_cnn()
    r = search(
        model,
        formats=FORMATS,
        budget=Budget(avg_bits=6.5),
        calib_data=calib,
        first_last_min_bits=8,
        progress=False,
    )
    assert r.assignment["0"] == "w8a8" and r.assignment["6"] == "w8a8"
    assert r.assignment["3"] == "w2a8"


def test_more_budget_never_predicts_worse(tmp_path):
    model, calib = tiny_cnn()
    preds = [
        search(
            model,
            formats=FORMATS,
            budget=Budget(max_bytes=b),
            calib_data=calib,
            progress=False,
            cache_dir=tmp_path,
        ).predicted
        for b in (1400, 2200, 3400)
    ]
    assert preds == sorted(preds, reverse=True)
    u = uniform_choice(FORMATS, "w2a8", 3)
    assert u.tolist() == [0, 0, 0]


def test_accuracy_mode_reports_every_trial():
    model, calib = tiny_cnn()
    x = torch.randn(64, 1, 6, 6)
    with torch.no_grad():
        ref = model(x)

    def fidelity(m):  # negative relative error in percent: 0 for the float model
        with torch.no_grad():
            return -100 * float((m(x) - ref).pow(2).sum() / ref.pow(2).sum())

    r = search(
        model,
        formats=FORMATS,
        calib_data=calib,
        eval_fn=fidelity,
        max_drop=1.0,
        max_evals=3,
        progress=False,
    )
    assert r.baseline == pytest.approx(0.0, abs=1e-9) and 1 <= len(r.tried) <= 3
    passed = [t for t in r.tried if t["passed"]]
    assert r.assignment == min(passed, key=lambda t: t["bytes"])["assignment"]
    q = compactnn.compress(model, r.recipe, calib_data=calib, progress=False)
    assert fidelity(q) >= -1.0
    # the budget and the chosen recipe's measured quality, as search.json records them
    assert set(r.budget) == {"max_drop", "max_evals", "baseline", "quality", "drop"}
    assert r.budget["max_drop"] == 1.0 and r.budget["max_evals"] == 3
    assert r.budget["baseline"] == pytest.approx(fidelity(model), abs=1e-9)
    assert r.budget["quality"] == pytest.approx(fidelity(q), rel=1e-6, abs=1e-9)
    assert r.budget["drop"] == pytest.approx(r.budget["baseline"] - r.budget["quality"])
    assert r.to_dict()["budget"] == r.budget


def test_accuracy_mode_spends_every_evaluation_when_all_pass(tmp_path):
    model, calib = tiny_cnn()
    calls = []

    def always_fine(m):  # every compressed model passes: no repair is ever needed
        calls.append(m)
        return 1.0

    def run(max_evals):
        calls.clear()
        return search(
            model,
            formats=FORMATS,
            calib_data=calib,
            eval_fn=always_fine,
            max_drop=0.5,
            max_evals=max_evals,
            progress=False,
            cache_dir=tmp_path,
        )

    r4 = run(4)
    assert len(calls) == 1 + 4 and len(r4.tried) == 4  # the float model, then four trials
    stages = [t["stage"] for t in r4.tried]
    assert all(t["passed"] for t in r4.tried) and stages == ["bisection"] * 3 + ["cheapest"]
    sizes = [t["bytes"] for t in r4.tried]
    assert sizes == sorted(sizes, reverse=True) and r4.cost["bytes"] == sizes[-1]
    cheapest = r4.costs["bytes"].min(axis=1).sum()  # every layer at its smallest format
    assert r4.cost["bytes"] == cheapest == run(2).cost["bytes"]  # the last trial: the cheapest


def test_user_mistakes():
    model, calib = tiny_cnn()
    with pytest.raises(CompactnnError, match="budget"):
        search(model, formats=FORMATS, calib_data=calib)
    with pytest.raises(CompactnnError, match="at least two"):
        search(model, formats=["w4a8"], budget=Budget(avg_bits=4), calib_data=calib)
    with pytest.raises(CompactnnError, match="smallest reachable"):
        search(
            model, formats=FORMATS, budget=Budget(max_bytes=10), calib_data=calib, progress=False
        )
    with pytest.raises(CompactnnError, match="max_bytes"):
        Budget(max_bytes=-1)
    assert np.isfinite(1.0)


class BiasFreeConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_byte_budget_counts_the_bias_batch_norm_folding_creates(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model, x = BiasFreeConvBN().eval(), torch.randn(64, 3, 16, 16)
    r = search(model, formats=FORMATS, budget=Budget(max_bytes=3000), calib_data=x, progress=False)
    q = compactnn.compress(model, r.recipe, calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "art")
    stored = {}
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        for key in f.keys():
            if key.split(".")[0] in r.assignment:
                t = f.get_tensor(key)
                stored[key] = t.numel() * t.element_size()
    assert stored["c1.bias"] == 16 * 4 and stored["c2.bias"] == 32 * 4  # made by folding
    assert r.cost["bytes"] == sum(stored.values()) <= 3000


def test_an_unreachable_budget_is_reported_in_its_own_unit():
    model, calib = tiny_cnn()
    with pytest.raises(
        CompactnnError, match=r"avg_bits: 1\.50 bits/weight is below the smallest reachable 2\.00"
    ):
        search(
            model, formats=FORMATS, budget=Budget(avg_bits=1.5), calib_data=calib, progress=False
        )
    with pytest.raises(CompactnnError, match=r"max_bytes: 10 bytes .* reachable [\d,]+ \("):
        search(
            model, formats=FORMATS, budget=Budget(max_bytes=10), calib_data=calib, progress=False
        )


class _SpareHead(nn.Module):
    """Registered last, never run: neither first nor last for first_last_bits."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(8, 4)
        self.fc1 = nn.Linear(6, 8)
        self.spare = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_first_last_min_bits_guards_the_layers_first_last_bits_promotes():
    from compactnn.mixed_precision.api import _allowed, end_layers, searched_layers
    from compactnn.mixed_precision.formats import parse_formats

    torch.manual_seed(0)
    model, batches = _SpareHead(), [torch.randn(4, 6)]
    layers = searched_layers(model, batches)
    assert list(layers) == ["fc1", "fc2", "spare"]  # run order, the spare head last
    assert end_layers(model, layers, batches) == {"fc1", "fc2"}
    fmts = parse_formats(["w2", "w8"])
    allowed = _allowed(layers, fmts, 8, ends=end_layers(model, layers, batches))
    assert allowed.tolist() == [[False, True], [False, True], [True, True]]


def fake_latency(monkeypatch, ratios, cpu_extra=0.0):
    """Stand-ins for the deploy-and-time steps: a fixed per-layer table (w4a8 0.6x w8a8) and
    whole-model checks measuring ``ratios`` in turn (CPU ratio ``+ cpu_extra``)."""
    from compactnn.mixed_precision import api

    per = {"w4a8": 6.0, "w8a8": 10.0}
    table = np.array([[1.2, 2.0], [1.8, 3.0], [3.0, 5.0]])  # columns sum to per[f]
    proxies = []

    def measure_table(model, formats, recipe_of, names, calib, example, macs, reference=None):
        return table, per, dict.fromkeys(formats)

    def check(model, recipe, calib, example, proxy_ms, reference):
        r = ratios[len(proxies)]
        proxies.append(proxy_ms)
        return {"reference": reference[0], "reference_ms": 10.0, "measured_ms": 10.0 * r,
                "proxy_ms": proxy_ms, "proxy_error": proxy_ms / (10.0 * r) - 1,
                "measured_ratio": r, "reference_cpu_ms": 10.0, "measured_cpu_ms": 10.0 * r,
                "cpu_ratio": r + cpu_extra}  # fmt: skip

    monkeypatch.setattr(api, "measure_table", measure_table)
    monkeypatch.setattr(api, "whole_model_check", check)
    return proxies


def latency_search(rounds=5):
    model, calib = tiny_cnn()
    return search(
        model,
        formats="w4a8,w8a8",
        budget=Budget(max_latency_ratio=0.8),
        calib_data=calib,
        latency_example=calib[0],
        latency_rounds=rounds,
        progress=False,
    )


def test_a_missed_latency_budget_warns_why_and_records_met_false(monkeypatch):
    proxies = fake_latency(monkeypatch, [0.95, 0.9])
    with pytest.warns(UserWarning, match=r"NOT met: .*measured 0\.90x w8a8.*ratio 0\.8,") as caught:
        r = latency_search()
    # round 1 fits 8 ms (0.8 x 10); round 2 the limit 8 * 0.8 / 0.95; round 3 would need
    # 8 * 0.8 / 0.95 * 0.8 / 0.9 = 5.99 ms, below the table's fastest assignment (6 ms)
    assert len(r.latency["checks"]) == 2 and proxies[0] <= 8 and proxies[1] <= 8 * 0.8 / 0.95
    tighter = 8 * 0.8 / 0.95 * 0.8 / 0.9
    assert f"limit {tighter:.3g} ms had no solution" in str(caught[0].message)
    assert "fastest assignment is 6 ms" in str(caught[0].message)
    assert r.budget["met"] is False and r.budget["measured_ratio"] == 0.9
    assert str(caught[0].message).endswith(r.budget["not_met"])
    assert json.loads(json.dumps(r.to_dict()))["budget"]["met"] is False


def test_a_met_latency_budget_and_spent_rounds_are_recorded(monkeypatch):
    fake_latency(monkeypatch, [0.95, 0.7])
    r = latency_search()
    assert r.budget == {"max_latency_ratio": 0.8, "met": True, "measured_ratio": 0.7}
    fake_latency(monkeypatch, [0.7], cpu_extra=0.2)  # the CPU ratio (0.9) is the larger
    with pytest.warns(UserWarning, match=r"measured 0\.90x.*latency_rounds=1 whole-model"):
        r = latency_search(rounds=1)
    assert r.budget["met"] is False and len(r.latency["checks"]) == 1


def test_split_attention_projections_are_searched_and_quantized():
    """The search listed the float model's layers: the q/k/v projections compress splits out
    of each nn.MultiheadAttention were never searched (left float as "not targeted")."""
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(2)]
    r = search(
        model, formats=["w4a8", "w8a8"], budget=Budget(avg_bits=6), calib_data=calib,
        progress=False,
    )  # fmt: skip
    attentions = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    projections = {f"{a}.{p}_proj" for a in attentions for p in ("q", "k", "v", "out")}
    assert projections <= set(r.layers)
    q = compactnn.compress(model, r.recipe, calib_data=calib, progress=False)
    for name, fmt in r.assignment.items():
        assert q.get_submodule(name).weight_spec.bits == int(fmt[1])
    assert compactnn.info_of(q)["float_layers"] == {}
    # exact bytes: the cost model's total plus the float tensors outside the searched layers
    covered = tuple(f"{n}." for n in (*r.layers, *attentions))
    outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(covered))
    assert outside > 0 and theoretical_size(q) == r.cost["bytes"] + 4 * outside
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(model.get_submodule(attentions[0])) is nn.MultiheadAttention


class _UnsplitAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.filterwarnings("ignore:kept in float")
def test_the_out_proj_of_an_unsplit_attention_is_not_searched():
    """The attention reads that weight and never calls the layer, so compress keeps it float
    (add_bias_kv=True: not split); the search priced it as quantized."""
    from compactnn.mixed_precision.api import searched_layers

    torch.manual_seed(0)
    model, calib = _UnsplitAttention().eval(), [torch.randn(4, 5, 8)]
    assert list(searched_layers(model, calib)) == ["fc"]
    r = search(model, formats=FORMATS, budget=Budget(avg_bits=4), calib_data=calib, progress=False)
    q = compactnn.compress(model, r.recipe, calib_data=calib, progress=False)
    assert "attn.out_proj" in compactnn.info_of(q)["float_layers"]
    assert theoretical_size(q) == r.cost["bytes"] + 4 * sum(
        p.numel() for p in model.attn.parameters()
    )
