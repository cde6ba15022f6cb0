"""`compactnn report` / build_report on inputs alone: perplexity of a causal LM (lower is
better), output cosine of any other model, each checked against a computation by hand."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.errors import CompactnnError
from compactnn.report import build_report
from compactnn.report.scoring import delta_cell, front_labels, pareto_front


def _perplexity_by_hand(model, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """exp of the mean cross-entropy over next-token targets that are real tokens predicted
    from real tokens."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    return math.exp(float(loss[keep].mean()))


def _brute_front(rows: list[dict], cost, higher: bool) -> list[str]:
    """Labels of rows no other row beats: costs no more, no worse, better in one."""
    sign = 1 if higher else -1

    def beats(a, b):
        qa, qb = sign * a["quality"], sign * b["quality"]
        return cost(a) <= cost(b) and qa >= qb and (cost(a) < cost(b) or qa > qb)

    return [r["label"] for r in rows if not any(beats(o, r) for o in rows if o is not r)]


@pytest.fixture()
def fake_timing(monkeypatch):
    """The side-by-side timing replaced by fixed latencies (float 2 ms, the others 1, 3,
    4... ms in order): fast, and a latency front that does not depend on the machine."""
    from compactnn.measure.float_paths import EAGER, FloatPaths
    from compactnn.measure.timing import Timing
    from compactnn.report import any_model

    def paths(model, example, **kwargs):
        def t(s):
            return Timing(median_s=s, min_s=s, max_s=s, runs=1, warmup=1, threads=1)

        ms = [1, *range(3, 3 + len(kwargs["extra"]))]
        timings = {k: t(m * 1e-3) for k, m in zip(kwargs["extra"], ms, strict=False)}
        return FloatPaths({EAGER: t(2e-3), **timings}, errors={EAGER: 0.0})

    monkeypatch.setattr(any_model, "fastest_float_path", paths)


@pytest.fixture(scope="module")
def lm_project(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face folder, two artifacts of it, and token ids
    with right padding."""
    from compactnn.models.tiny_hf import tiny_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm_report")
    model, calib = tiny_model("llama")
    model.save_pretrained(root / "lm")
    for recipe in ("w4-g32", "w8a8"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = compactnn.compress(model, recipe, calib_data=calib, progress=False)
        compactnn.save(q, root / recipe)
    ids = torch.randint(4, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 10:] = mask[3, 12:] = 0  # right padding: 6 + 4 targets not scored
    save_file({"input_ids": ids, "attention_mask": mask}, str(root / "ids.safetensors"))
    bad = ids.clone()
    bad[2, 3] = 500  # out of the 128-token vocabulary
    save_file({"input_ids": bad, "attention_mask": mask}, str(root / "oov.safetensors"))
    return root, model, ids, mask


def test_cli_report_of_a_causal_lm_scores_perplexity_lower_is_better(
    lm_project, capsys, monkeypatch, fake_timing
):
    root, model, ids, mask = lm_project
    monkeypatch.chdir(root)
    argv = ["report", "w4-g32", "w8a8", "--model", "lm", "--data", "ids.safetensors", "--no-memory"]
    assert main([*argv, "--out", "rep", "--runs", "1", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    results = json.loads((root / "rep" / "results.json").read_text())
    assert results["metric"] == "perplexity" and results["higher_is_better"] is False
    assert results["scored_tokens"] == 6 * 15 - 6 - 4 and results["samples"] == 6
    rows = {r["label"]: r for r in results["rows"]}
    assert rows["float"]["quality"] == pytest.approx(_perplexity_by_hand(model, ids, mask), 1e-5)
    from compactnn.models.tiny_hf import tiny_model

    for recipe in ("w4-g32", "w8a8"):
        loaded = compactnn.load(root / recipe, model=tiny_model("llama")[0])
        want = _perplexity_by_hand(loaded, ids, mask)
        assert rows[recipe]["quality"] == pytest.approx(want, rel=1e-5)
        assert rows[recipe]["higher_is_better"] is False
    assert list(rows) == ["float", "w4-g32", "w4-g32 kernels", "w8a8"]
    fast = compactnn.to_kernels(compactnn.load(root / "w4-g32", model=tiny_model("llama")[0]))
    want = _perplexity_by_hand(fast, ids, mask)  # the low-bit kernels' own perplexity
    assert rows["w4-g32 kernels"]["quality"] == pytest.approx(want, rel=1e-4)
    sized = [r for r in results["rows"] if not r.get("shares_size")]
    assert results["pareto_front"]["size"] == _brute_front(sized, lambda r: r["size_bytes"], False)
    latency = lambda r: r["latency"]["median_s"]  # noqa: E731
    delivered = [r for r in results["rows"] if r["runs_as"] != "simulated"]  # no speedup claimed
    assert results["pareto_front"]["latency"] == _brute_front(delivered, latency, False)
    assert results["pareto_front"]["latency"] != _brute_front(delivered, latency, True)
    header, float_line = out.splitlines()[:2]
    assert "perplexity (lower is better)" in header and "vs float" in header
    assert f"{rows['float']['quality']:.2f}" in float_line.split()
    w4 = rows["w4-g32"]
    ratio = w4["quality"] / rows["float"]["quality"]
    assert f"{w4['quality'] - rows['float']['quality']:+.2f} ({ratio:.3f}x" in out
    md = (root / "rep" / "report.md").read_text()
    assert "over the 80 predicted tokens of the 6 sequences" in md and "lower is better" in md
    assert (root / "rep" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_report_refuses_token_ids_the_model_cannot_take(lm_project, capsys, monkeypatch):
    root, *_ = lm_project
    monkeypatch.chdir(root)
    argv = ["report", "w4-g32", "--model", "lm", "--data", "oov.safetensors", "--out", "r2",
            "--no-memory"]  # fmt: skip
    argv.append("--no-progress")  # else transformers' loading bar, unless an earlier test hid it
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "largest id found is 500" in err[0], err
    assert not (root / "r2").exists()


def test_build_report_of_an_encoder_scores_output_cosine(tmp_path, fake_timing):
    """BERT has no next-token logits: the mean per-sample cosine of its last hidden states
    with the float model's, higher is better."""
    from compactnn.models.tiny_hf import tiny_model

    torch.set_num_threads(1)
    model, calib = tiny_model("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    compactnn.save(q, tmp_path / "w4")
    ids = torch.randint(4, 128, (5, 12), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(CompactnnError, match="metric='perplexity' needs a Hugging Face causal"):
        build_report([tmp_path / "w4"], model=model, data=data, metric="perplexity",
                     out=tmp_path / "r", progress=False)  # fmt: skip
    with pytest.raises(CompactnnError, match="metric='top1' needs labels"):
        build_report([tmp_path / "w4"], model=model, data=data, metric="top1",
                     out=tmp_path / "r", progress=False)  # fmt: skip
    results = build_report(
        [tmp_path / "w4"], model=model, data=data, out=tmp_path / "r", runs=1, quick=True,
        progress=False,
    )  # fmt: skip
    assert results["metric"] == "cosine" and results["higher_is_better"] is True
    loaded = compactnn.load(tmp_path / "w4", model=tiny_model("bert")[0]).eval()
    with torch.no_grad():
        ref = model(**data).last_hidden_state.reshape(5, -1)
        out = loaded(**data).last_hidden_state.reshape(5, -1)
    want = float((ref * out).sum(1).div(ref.norm(dim=1) * out.norm(dim=1)).mean())
    rows = {r["label"]: r for r in results["rows"]}
    assert rows["w4-g32"]["quality"] == pytest.approx(want, abs=1e-5)
    assert rows["float"]["quality"] == pytest.approx(1.0, abs=1e-6)
    sized = [r for r in results["rows"] if not r.get("shares_size")]
    assert results["pareto_front"]["size"] == _brute_front(sized, lambda r: r["size_bytes"], True)
    assert (
        "| recipe | runs as | output cosine | vs float |"
        in (tmp_path / "r" / "report.md").read_text()
    )
    assert model.training is False and not any(p.grad is not None for p in model.parameters())


def test_build_report_refuses_inputs_the_model_cannot_run(tmp_path):
    from torch import nn

    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    q = compactnn.compress(net, "w8", calib_data=torch.randn(8, 3, 4), progress=False)
    compactnn.save(q, tmp_path / "w8")
    with pytest.raises(CompactnnError, match=r"^data does not fit the model: it holds") as err:
        build_report([tmp_path / "w8"], model=net, data=torch.randn(4, 5), out=tmp_path / "r")
    assert "\n" not in str(err.value) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("higher", [True, False])
def test_pareto_front_follows_the_metric_direction(higher):
    costs = np.array([1.0, 2.0, 3.0, 4.0])
    quality = np.array([10.0, 20.0, 15.0, 30.0])
    points = list(zip(costs.tolist(), quality.tolist(), strict=True))
    sign = 1 if higher else -1
    want = [
        not any(c2 <= c and sign * q2 >= sign * q and (c2, q2) != (c, q) for c2, q2 in points)
        for c, q in points
    ]
    assert pareto_front(points, higher) == want
    # higher is better: 1, 2 and 4 improve as they cost more; lower: only the cheapest
    assert want == ([True, True, False, True] if higher else [True, False, False, False])
    rows = [
        {"label": str(i), "recipe": str(i), "metric": "top1" if higher else "perplexity",
         "quality": q, "size_bytes": c, "latency": {"median_s": c}}
        for i, (c, q) in enumerate(points)
    ]  # fmt: skip
    assert front_labels(rows, "size") == [str(i) for i, w in enumerate(want) if w]


def test_delta_cell_says_which_way_is_worse():
    assert delta_cell("perplexity", 33.0, 30.0) == "+3.00 (1.100x, worse)"
    assert delta_cell("perplexity", 27.0, 30.0) == "-3.00 (0.900x, better)"
    assert delta_cell("perplexity", 30.001, 30.0) == "+0.00 (1.000x)"
    assert delta_cell("top1", 97.5, 98.0) == "-0.50 pt"
    assert delta_cell("cosine", 0.99, 1.0) == "-0.0100"
