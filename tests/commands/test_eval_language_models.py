"""``compactnn eval`` on language models and reference artifacts: token ids checked against
the model, probe-pruned transformers, next-token perplexity beside the output cosine."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compactnn
from compactnn.cli import main


def test_reference_artifacts_need_no_model_argument(tmp_path, monkeypatch, capsys):
    """The artifact records the reference it came from; eval rebuilds it from that name."""
    monkeypatch.chdir(tmp_path)
    args = ["compress", "tiny-lm", "-r", "w8", "-o", "ref-art", "--no-progress"]
    assert main(args) == 0
    header = json.loads((tmp_path / "ref-art" / "compactnn.json").read_text())
    assert header["extra"]["source"]["model"] == "tiny-lm"
    capsys.readouterr()
    assert main(["eval", "ref-art", "--simulated", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "compressed" in out and "w8" in out


def test_a_hugging_face_model_is_a_transformer_whatever_its_data(tmp_path):
    from compactnn.commands.evaluate import _kind
    from compactnn.models.tiny_hf import tiny_model

    model, _ = tiny_model("llama")
    ids = torch.randint(0, 16, (2, 8))
    assert _kind(model, ids) == "transformer"  # a single tensor of token ids
    assert _kind(nn.Linear(8, 2), torch.randn(2, 8)) == "cnn"


def test_eval_names_sequences_too_long_and_ids_out_of_the_vocabulary(token_files, capsys):
    def error(name):  # the last line: transformers draws its loading bar on stderr first
        data = str(token_files / name)
        rc = main(["eval", str(token_files / "bert"), "--data", data, "--quick", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2, err
        return data, err.splitlines()[-1]

    data, err = error("long.npy")
    assert err == (
        f"error: --data {data} holds sequences of 40 tokens and the model takes at most 32 "
        "(max_position_embeddings in its config.json): cut each sequence to 32 tokens or "
        "fewer (e.g. ids[:, :32], or windows of 32) and save the file again."
    )
    data, err = error("oov_edge.npy")
    assert err == (
        f"error: --data {data} holds token ids out of the model's vocabulary: the largest id "
        "found is 100, and the vocabulary has 100 entries (ids 0 to 99). Tokenize the text "
        "with the model's own tokenizer (the one saved with it)."
    )


def test_eval_runs_a_probe_pruned_artifact_as_itself_and_claims_its_speedup(
    tmp_path, capsys, monkeypatch
):
    """A pp30 artifact's MLPs run on sliced weights: eval times that model itself, names it
    "PyTorch fp32 (probe-pruned)" and gives its real speedup (below 1x is fine), with no
    to_kernels advice (that is for quantized transformers)."""
    import warnings

    from compactnn.commands import evaluate as command
    from compactnn.models.tiny_hf import tiny_model
    from compactnn.prune.probe import ProbeMLP

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    model, calib = tiny_model("llama")
    model.save_pretrained("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "probe: only 16 calibration samples"
        pruned = compactnn.compress(model, "pp30", calib_data=calib, progress=False)
    compactnn.save(pruned, "art")
    np.save("ids.npy", np.random.default_rng(0).integers(4, 128, (4, 16)))
    timed = {}

    def paths(model, example, **kwargs):  # the side-by-side timing: 1 ms float, 4 ms pruned
        from compactnn.measure.float_paths import EAGER, FloatPaths
        from compactnn.measure.timing import Timing

        timed.update(kwargs["extra"])
        ms = {EAGER: 1e-3, "compressed": 4e-3}
        timings = {
            k: Timing(median_s=t, min_s=t, max_s=t, runs=3, warmup=1, threads=2)
            for k, t in ms.items()
        }
        return FloatPaths(timings, errors={EAGER: 0.0})

    monkeypatch.setattr(command, "fastest_float_path", paths)
    argv = ["eval", "art", "--model", "llama", "--data", "ids.npy", "--quick", "--no-progress"]
    assert main([*argv, "--json", "r.json"]) == 0
    out = capsys.readouterr().out
    [delivered] = timed.values()
    assert any(isinstance(m, ProbeMLP) for m in delivered.modules())
    rows = {r["model"]: r for r in json.loads(open("r.json").read())["rows"]}
    row = rows["compressed"]
    assert row["runtime"] == "PyTorch fp32 (probe-pruned)"
    assert row["speedup"] == pytest.approx(0.25)  # 1 ms / 4 ms: slower, and said so
    assert "  0.25x\n" in out and "simulated" not in out and "to_kernels:" not in out
    assert "runs as itself: probe-pruned (2 MLPs skip 30% of their hidden channels" in out


def _fake_float_paths(timed: dict):
    """A stand-in for the side-by-side timing (1 ms for every model) that records the models
    it was given to time (the delivered compressed one)."""
    from compactnn.measure.float_paths import EAGER, FloatPaths
    from compactnn.measure.timing import Timing

    def paths(model, example, **kwargs):
        timed.update(kwargs["extra"])
        t = Timing(median_s=1e-3, min_s=1e-3, max_s=1e-3, runs=3, warmup=1, threads=2)
        return FloatPaths({EAGER: t, **dict.fromkeys(kwargs["extra"], t)}, errors={EAGER: 0.0})

    return paths


def _perplexity_by_hand(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """exp(mean cross-entropy of logits[:, :-1] vs ids[:, 1:]) over the targets that are
    real tokens predicted from real tokens."""
    import math

    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    return math.exp(float(loss[keep].mean()))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eval_of_a_causal_lm_reports_perplexity_of_both_models_beside_the_cosine(
    arch, tmp_path, capsys, monkeypatch
):
    """Token ids without labels: next-token perplexity of the float and compressed models
    (padding left out), and their ratio, in the table and the JSON; the cosine stays."""
    from compactnn.commands import evaluate as command
    from compactnn.models.tiny_hf import tiny_model

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    model, _ = tiny_model(arch)
    model.save_pretrained("lm")
    ids = torch.randint(4, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 10:] = mask[3, 12:] = 0  # right padding: 6 + 4 targets not scored
    save_file({"input_ids": ids, "attention_mask": mask}, "ids.safetensors")
    timed = {}
    monkeypatch.setattr(command, "fastest_float_path", _fake_float_paths(timed))
    argv = ["eval", "lm", "--recipe", "w4-g32", "--data", "ids.safetensors", "--quick"]
    assert main([*argv, "--no-progress", "--json", "r.json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(open("r.json").read())
    base, row = result["rows"]
    [delivered] = timed.values()
    want = _perplexity_by_hand(model, ids, mask), _perplexity_by_hand(delivered, ids, mask)
    assert base["perplexity"] == pytest.approx(want[0], rel=1e-4)
    assert row["perplexity"] == pytest.approx(want[1], rel=1e-4)
    assert row["perplexity_ratio"] == pytest.approx(want[1] / want[0], rel=1e-4)
    assert base["perplexity_ratio"] is None and result["perplexity_tokens"] == 6 * 15 - 6 - 4
    assert base["metric"] == row["metric"] == "output cosine vs float"
    assert 0.9 < row["quality"] < 1 and base["quality"] == pytest.approx(1.0)
    header, float_line, compressed_line = out.splitlines()[1:4]
    assert header.split()[3:5] == ["quality", "perplexity"]
    assert f"{want[0]:.2f}" in float_line.split()
    assert f"{want[1]:.2f} ({want[1] / want[0]:.3f}x)" in compressed_line
    assert "perplexity: next-token, over 80 predicted tokens of --data ids.safetensors" in out


def test_hugging_face_lm_labels_are_scored_as_perplexity_not_classes(tmp_path, capsys, monkeypatch):
    """{input_ids, labels} (labels = the token ids, Hugging Face's LM convention) was refused:
    "top-1 scoring needs logits of shape (N, classes)"."""
    from compactnn.commands import evaluate as command
    from compactnn.models.tiny_hf import tiny_model

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    model, _ = tiny_model("gpt2")
    model.save_pretrained("lm")
    ids = torch.randint(4, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids, "labels": ids.clone()}, "lm_labels.safetensors")
    monkeypatch.setattr(command, "fastest_float_path", _fake_float_paths({}))
    argv = ["eval", "lm", "--recipe", "w8", "--data", "lm_labels.safetensors", "--quick"]
    assert main([*argv, "--no-progress", "--json", "r.json"]) == 0
    assert "are not classes; scoring next-token perplexity" in capsys.readouterr().err
    base = json.loads(open("r.json").read())["rows"][0]
    want = _perplexity_by_hand(model, ids, torch.ones_like(ids))
    assert base["perplexity"] == pytest.approx(want, rel=1e-4)


def test_eval_of_a_model_that_is_not_a_causal_lm_has_no_perplexity(
    token_files, capsys, monkeypatch
):
    """BERT's outputs are hidden states: no perplexity column, None in the JSON."""
    from compactnn.commands import evaluate as command

    monkeypatch.chdir(token_files)
    monkeypatch.setattr(command, "fastest_float_path", _fake_float_paths({}))
    argv = ["eval", "bert", "--data", "ok.npy", "--quick", "--no-progress", "--json", "r.json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((token_files / "r.json").read_text())
    assert result["rows"][0]["perplexity"] is None and result["perplexity_tokens"] is None
    assert "perplexity" not in out
