"""The checks ``deploy`` refuses with, called directly (no compression, no tracing)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compactnn.deployment import refusals
from compactnn.errors import CompactnnError


def test_a_deployed_model_is_recognised_without_its_class_and_refused():
    class Deployed(nn.Module):  # what check_args knows of api.DeployedModel
        is_deployed = True
        backend = "onnxruntime"

    with pytest.raises(CompactnnError, match=r"already deployed \(on onnxruntime\).*source"):
        refusals.check_args(Deployed(), "auto", torch.zeros(1, 2), "exact", "float")
    with pytest.raises(CompactnnError, match="plain float model"):  # the next check
        refusals.check_args(nn.Linear(2, 2), "auto", torch.zeros(1, 2), "exact", "float")
    with pytest.raises(CompactnnError, match=r"backend='tpu' is unknown.*'onednn'"):
        refusals.check_args(nn.Linear(2, 2), "tpu", torch.zeros(1, 2), "exact", "float")


def test_onnx_runtime_refuses_a_dict_argument_and_onednn_takes_it():
    sim, example = nn.Linear(2, 2), ({"x": torch.zeros(1, 2)},)
    with pytest.raises(CompactnnError, match=r"ONNX Runtime takes tensors.*backend='onednn'"):
        refusals.check_backend("onnxruntime", sim, example)
    refusals.check_backend("onednn", sim, example)
    refusals.check_backend("onnxruntime", sim, torch.zeros(1, 2))


def test_kept_layers_are_listed_by_reason_and_refused_only_on_error():
    kept = {"a": "no kernel", "b": "no kernel", "c": "no kernel", "d": "no kernel", "e": "x"}
    assert refusals.listing(kept) == "4 layers: no kernel (a, b, c, ...); e (x)"
    assert refusals.listing({}) == "none"
    assert refusals.handle_unsupported(kept, "float") is None
    with pytest.raises(CompactnnError, match=r"Targets\(ignore=\['a', 'b', 'c', 'd', 'e'\]\)"):
        refusals.handle_unsupported(kept, "error")


def test_a_weight_only_training_recipe_is_pointed_to_its_activation_form():
    sim = nn.Sequential(nn.Linear(4, 4))
    sim._compactnn = {"recipe": SimpleNamespace(name="w5-inq")}  # as compress records it
    msg = refusals.no_integer_layers(sim, {"0": "its input is not quantized (weight-only recipe)"})
    assert "'w5a8-inq' (w5-inq with 8-bit activations)" in msg and "0" in msg
    sim._compactnn = {"recipe": SimpleNamespace(name="my-recipe")}
    assert "e.g. 'w8a8', 'w4a4'" in refusals.no_integer_layers(sim, {})


@pytest.mark.parametrize(
    ("recipe", "advice"),
    [
        ("w4-g32", "'w4a8' (w4-g32 with 8-bit activations, per-channel weights)"),
        ("w4-g32-gptq", "'w4a8-gptq' (w4-g32-gptq with 8-bit activations, per-channel"),
        ("w4a8-g32", "'w4a8' (w4a8-g32 with 8-bit activations, per-channel weights)"),
    ],
)
def test_a_group_wise_recipe_is_pointed_to_a_per_channel_form_kernels_take(recipe, advice):
    """'w4a8-g32' (what the advice said before) is refused too: per-group weight scales."""
    sim = nn.Sequential(nn.Linear(4, 4))
    sim._compactnn = {"recipe": SimpleNamespace(name=recipe)}
    msg = refusals.no_integer_layers(sim, {"0": "per-group weight scales"})
    assert advice in msg and "'w4a8-g32'" not in msg.split("(e.g.")[1].split(";")[0]


@pytest.mark.parametrize("tolerance", [-1, -0.5, float("nan"), float("inf"), "2", True, None])
def test_a_bad_tolerance_is_refused_before_the_model_is_looked_at(tolerance):
    with pytest.raises(CompactnnError, match=r"^tolerance=.*finite number of output steps >= 0"):
        refusals.check_args(nn.Linear(2, 2), "auto", torch.zeros(1, 2), "exact", "float", tolerance)
    for fine in (0, 2, 7.5):  # then the next check (a plain float model) speaks
        with pytest.raises(CompactnnError, match="plain float model"):
            refusals.check_args(nn.Linear(2, 2), "auto", torch.zeros(1, 2), "exact", "float", fine)


def test_an_internal_error_is_a_reason_to_report_and_a_refusal_its_own():
    assert refusals.failure_reason(CompactnnError("use w8a8.")) == "use w8a8."
    reason = refusals.failure_reason(AttributeError("'int' object has no attribute 'dtype'"))
    assert reason.startswith("AttributeError: 'int' object has no attribute 'dtype' (an internal")


def test_nothing_to_deploy_is_worded_for_the_command_line_and_python():
    """`compactnn deploy ARTIFACT` printed "qmodel has no quantized layers": a parameter name
    the command line never shows. Both refusals say what the model is and what to run."""
    example = torch.zeros(1, 2)
    with pytest.raises(CompactnnError) as plain:  # e.g. a channel-pruned artifact
        refusals.check_args(nn.Linear(2, 2), "auto", example, "exact", "float")
    said = str(plain.value)  # Python's words: what to pass deploy (no command line)
    assert "plain float model" in said and "nothing to deploy" in said
    assert "compactnn.compress(model, 'w8a8'" in said and "compactnn eval" not in said
    cli = refusals.PLAIN_FLOAT_CLI  # the command line's (commands/deploy.py raises it)
    assert "qmodel" not in cli and "channel-pruned artifact" in cli
    assert "compactnn eval ARTIFACT" in cli
    assert "recipe that also quantizes" in cli and "docs/cli.md" in cli

    class Probe(nn.Linear):  # a compactnn module that simulates no integer weight
        __module__ = "compactnn.prune.probe"

    with pytest.raises(CompactnnError) as simulated:
        refusals.check_args(Probe(2, 2), "auto", example, "exact", "float")
    said = str(simulated.value)
    assert "qmodel" not in said and "no quantized layers" in said
    assert "compactnn compress MODEL --recipe w8a8" in said and "compactnn.compress(" in said
