"""What the user gets: a channel-pruned model is delivered as itself, on its fastest float
path, never as "simulated"; quantized models keep going through ``deploy``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.measure.float_paths import EAGER, FloatPaths
from compactnn.measure.timing import Timing
from compactnn.report import delivery
from compactnn.report.delivery import SIMULATED, deliver_float, is_plain_float
from tests.report._nets import X, cnn

_cnn = cnn


def _compress(model: nn.Module, recipe: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "channel pruning skipped: 3 (the outputs)"
        return compactnn.compress(model, recipe, calib_data=X, progress=False)


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    model = _compress(_cnn(), "ch50")
    assert model[0].out_channels == 4  # really fewer channels
    return model


def test_a_channel_pruned_model_is_plain_float_and_a_quantized_one_is_not(pruned):
    assert is_plain_float(pruned) and is_plain_float(_cnn())
    assert not is_plain_float(_compress(_cnn(), "w8a8"))
    assert not is_plain_float(_compress(pruned, "w8a8"))  # pruned, then quantized: deploy


def test_deliver_float_times_the_pruned_model_itself_and_names_the_runtime(pruned, monkeypatch):
    seen = []

    def spy(model, example, **kwargs):
        seen.append((model, kwargs))
        t = Timing(median_s=1e-3, min_s=1e-3, max_s=1e-3, runs=3, warmup=2, threads=1)
        return model, FloatPaths({EAGER: t}, {"torch.compile": "not tried in quick mode"})

    monkeypatch.setattr(delivery, "fastest_float_form", spy)
    fast, runtime, notes = deliver_float(pruned, X[:8], quick=False, threads=1)
    assert [m for m, _ in seen] == [pruned] and fast is pruned
    assert seen[0][1] == {"quick": False, "threads": 1}
    assert runtime == "PyTorch fp32" != SIMULATED
    assert notes[0].startswith("runs natively: a plain float model")
    assert "float paths, PyTorch fp32" in notes[0] and "skipped torch.compile" in notes[0]
    assert " ms" not in notes[0]  # the race's times would contradict the row's measurement


def test_deliver_float_races_the_float_paths_and_keeps_the_outputs(pruned):
    fast, runtime, _ = deliver_float(pruned, X[:8], quick=True, threads=1)
    assert runtime in delivery.FLOAT_PATH_NAMES.values()
    with torch.no_grad():
        ref, out = pruned(X), fast(X)  # another batch size than the race's
    # fp32 paths differ by summation order; bf16 autocast keeps 8 mantissa bits
    assert (out.float() - ref).abs().max() <= 5e-2 * ref.abs().max()


def test_a_probe_pruned_transformer_is_delivered_as_itself(monkeypatch):
    """pp30's MLPs run on sliced weights in eager PyTorch: that is what the user runs, so
    deliver returns the model itself, named honestly, without trying to_kernels."""
    from compactnn.models.tiny_hf import outputs, tiny_model
    from compactnn.prune.probe import ProbeMLP

    torch.set_num_threads(1)
    model, calib = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "probe: only 16 calibration samples"
        pruned = compactnn.compress(model, "pp30", calib_data=calib, progress=False)
    assert delivery.is_probe_pruned(pruned) and not is_plain_float(pruned)
    assert not delivery.is_probe_pruned(model) and not delivery.is_probe_pruned(_cnn())
    assert not delivery.is_probe_pruned(_compress(_cnn(), "w8a8"))

    def no_kernels(*args, **kwargs):
        raise AssertionError("to_kernels was tried on a probe-pruned model")

    monkeypatch.setattr(compactnn, "to_kernels", no_kernels)
    fast, runtime, notes = delivery.deliver("transformer", pruned, calib[0])
    assert fast is pruned and runtime == "PyTorch fp32 (probe-pruned)" != SIMULATED
    mlps = [m for m in pruned.modules() if isinstance(m, ProbeMLP)]
    assert notes == [
        f"runs as itself: probe-pruned ({len(mlps)} MLPs skip 30% of their hidden channels, "
        "chosen per sample by a probe; weights sliced at run time) in eager PyTorch fp32 "
        "(deploy does not take it; to_kernels would keep the probe MLPs in bfloat16)"
    ]
    outputs(fast, calib[0])
    width = mlps[0].down_proj.in_features
    assert mlps[0].last_kept.shape[-1] == width - int(0.3 * width)  # really sliced


def test_a_partly_swapped_transformer_says_how_much_runs_on_kernels():
    info = {"swapped": {"a": "K", "b": "K"}, "simulated": {"c": "no kernel"}, "dtype": "bf16"}
    assert delivery.kernels_runtime(info) == "kernels bf16 (2 of 3 layers; 1 simulated)"
    assert delivery.kernels_runtime({**info, "simulated": {}}) == "kernels bf16"


def test_slower_than_float_note_only_below_speedup_one():
    note = delivery.slower_note(0.002, 0.0051)
    assert note.startswith("slower than the fastest float path (5.10 ms vs 2.00 ms)")
    assert note.endswith("the float model is the faster way to run this")
    assert delivery.slower_note(0.002, 0.002) is None
    assert delivery.slower_note(0.002, 0.0015) is None


def test_notes_drop_tracer_noise_and_duplicates_and_reasons_cut_at_names(monkeypatch):
    names = ", ".join(f"encoder.layer.{i}.attention.self.query" for i in range(20))

    def fail(kind, model, example):
        for _ in range(2):
            warnings.warn(
                "Converting a tensor to a Python boolean", torch.jit.TracerWarning, stacklevel=2
            )
            warnings.warn("3 layers stay float", UserWarning, stacklevel=2)
        raise ValueError(f"no kernel for {names}")

    monkeypatch.setattr(delivery, "_deliver", fail)
    model = nn.Linear(2, 2)
    got, runtime, notes = delivery.deliver("transformer", model, torch.zeros(1, 2))
    assert got is model and runtime == SIMULATED
    reason, *rest = notes
    assert rest == ["delivery: 3 layers stay float"]
    assert reason.startswith("runs simulated: ValueError: no kernel for encoder.layer.0.")
    assert reason.endswith(" ...") and len(reason) <= len("runs simulated: ValueError: ") + 300
    last = reason.removesuffix(" ...").split(", ")[-1]
    assert last in names.split(", ")  # whole names only, never cut inside one


def test_slower_note_hedges_when_a_timing_looks_inflated():
    from compactnn.measure.timing import Timing, suspect_reasons

    calm = Timing(0.005, 0.005, 0.005, 10, 2, 2, cpu_s=0.005, cpu_share=1.0)
    noisy = Timing(0.005, 0.001, 0.02, 10, 2, 2, cpu_s=0.005, cpu_share=1.0)  # 380% spread
    assert suspect_reasons(noisy) and not suspect_reasons(calm)
    assert not delivery.timing_suspect(calm.to_dict(), None)
    assert delivery.timing_suspect(calm.to_dict(), noisy.to_dict())
    note = delivery.slower_note(0.002, 0.005, suspect=True)
    assert "look inflated" in note and "the float model is the faster way" not in note
    assert delivery.slower_note(0.002, 0.001, suspect=True) is None


def test_rounding_cause_follows_what_ran():
    # TernaryBERT's eval: 3 tables on kernels, 38 layers simulated in a bfloat16 model
    fast = nn.Identity()
    tables = {f"bert.embeddings.{t}": "EmbeddingKernel" for t in ("word", "position", "type")}
    fast._compactnn_kernels = {
        "swapped": tables,
        "simulated": [f"layer{i}" for i in range(38)],
        "dtype": "bfloat16",
    }
    cause = delivery.rounding_cause(fast)
    assert cause.startswith("the deployed model runs in bfloat16 (")
    assert "3 embedding table(s) gathered from their codes" in cause
    assert "38 of 41 quantized layers simulated (float32 on bfloat16 inputs)" in cause
    assert "int32" not in cause
    # float32 kernels, W8A8 and weight-only: only the kernels can differ
    fast._compactnn_kernels = {
        "swapped": {"a": "W8A8Linear", "b": "Int4WeightLinear"},
        "simulated": [],
        "dtype": "float32",
    }
    assert delivery.rounding_cause(fast) == (
        "1 layer(s) on int8 kernels (exact int32 sums, per-token rounding); 1 weight-only "
        "layer(s) on kernels of the dequantized weights (docs/transformers.md)"
    )
    # compactnn.deploy's integer models (no to_kernels record): integer rounding
    assert delivery.rounding_cause(nn.Identity()).startswith("integer kernels round differently")


def test_a_transformer_with_per_group_activations_is_delivered_on_matmulnbits():
    pytest.importorskip("onnxruntime")
    from tests.kernels._keywords import compressed, grouped_recipe

    q, batch = compressed(grouped_recipe())
    fast, runtime, notes = delivery.deliver("transformer", q, batch)
    assert runtime == "ONNX Runtime MatMulNBits (accuracy_level 4)" and notes == []
    with torch.no_grad():
        ref = q(**batch)[0]
    assert (fast(**batch)[0] - ref).abs().max() <= 1e-5 * ref.abs().max()
    # a weight-only model keeps the to_kernels delivery
    plain, _ = compressed("w4-g32")
    assert delivery.deliver("transformer", plain, batch)[1].startswith("kernels")
