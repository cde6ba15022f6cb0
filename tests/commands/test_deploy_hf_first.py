"""``compactnn deploy`` of a Hugging Face artifact says why it cannot run it first, before it
asks for --model or --data, with the ways that do run it."""

from __future__ import annotations

import pytest

import compactnn
from compactnn.cli import main
from compactnn.deployment import refusals
from compactnn.models.tiny_hf import tiny_model

pytest.importorskip("transformers")


@pytest.mark.filterwarnings("ignore:smoothquant. only")
@pytest.mark.parametrize(
    ("recipe", "words"),
    [
        ("w8", "this weight-only LlamaForCausalLM has none (15 layers quantize weights only)"),
        ("w8a8-smoothquant", "cannot trace the Hugging Face LlamaForCausalLM: its W8A8 linear"),
    ],
)
def test_the_reason_comes_before_model_and_data(recipe, words, tmp_path, capsys, monkeypatch):
    model, calib = tiny_model("llama")
    q = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    compactnn.save(q, tmp_path / "art")
    monkeypatch.chdir(tmp_path)
    assert main(["deploy", "art"]) == 2  # no --model, no --data
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1  # one line
    err = errors[0]
    assert err.startswith("error: compactnn deploy art: ")
    assert words in err and "compactnn.to_kernels(q)" in err
    assert "`compactnn export art --format onnx --out DIR`" in err
    assert "pass the float model again" not in err and "pass --data" not in err


def _header(act_spec, dynamic_act=()):
    layers = {"fc": {"act_spec": act_spec}, "proj": {"act_spec": act_spec}}
    extra = {"hf": {"class": "BertModel"}, "dynamic_act": list(dynamic_act)}
    return {"extra": extra, "layers": layers}


@pytest.mark.parametrize(
    ("spec", "dynamic", "kind"),
    [
        (None, (), "weight-only"),
        ({"bits": 8, "granularity": "tensor"}, ("fc", "proj"), "per-token"),
        ({"bits": 8, "granularity": "group", "group_size": 32}, (), "runtime"),
        ({"bits": 8, "granularity": "tensor", "dynamic": True}, (), "runtime"),
        ({"bits": 8, "granularity": "tensor"}, (), "static"),
        ({"bits": 8, "granularity": "tensor"}, ("fc",), "static"),  # mixed: as the model's
    ],
)
def test_the_header_gives_the_loaded_models_reason(spec, dynamic, kind):
    said = refusals.hf_artifact_reason(_header(spec, dynamic), "out/q")
    same = refusals.hf_reason(kind, "BertModel", 2, "out/q").removesuffix(".")
    assert said.startswith(f"compactnn deploy out/q: {same}; `compactnn export out/q --format")


def test_a_cnn_artifact_is_left_to_the_usual_checks():
    assert refusals.hf_artifact_reason({"extra": {}, "layers": {"fc": {}}}, "a") is None
    assert refusals.hf_artifact_reason(_header(None) | {"layers": {}}, "a") is None
