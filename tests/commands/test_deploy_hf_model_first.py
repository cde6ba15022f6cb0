"""``compactnn deploy HF_MODEL --recipe R`` says why it cannot deploy a Hugging Face model
before it asks for --data or compresses anything (it used to calibrate MiniLM for ~30 s and
then refuse), with where the recipe's model runs and the commands that get there."""

from __future__ import annotations

import pytest

import compactnn
from compactnn.cli import main
from compactnn.deployment.refusals import recipe_kind
from compactnn.models.tiny_hf import tiny_model
from compactnn.recipe import resolve_recipe

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "llama"
    tiny_model("llama")[0].save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("recipe", "words", "command_recipe"),
    [
        ("w8", "this weight-only LlamaForCausalLM has none", "w8"),
        ("w8a8", "quantize activations on static grids", "w8a8-smoothquant"),
        ("w8a8-smoothquant", "(per-token activations) run on int8 kernels", "w8a8-smoothquant"),
        ("w4a8g-g32-gptq", "MatMulNBits / DynamicQuantizeMatMul", "w4a8g-g32-gptq"),
    ],
)
def test_refused_before_data_and_compression(
    recipe, words, command_recipe, llama_dir, capsys, monkeypatch
):
    def no_compress(*args, **kwargs):
        raise AssertionError("deploy compressed a model it then refuses")

    monkeypatch.setattr(compactnn, "compress", no_compress)
    monkeypatch.chdir(llama_dir.parent)
    assert main(["deploy", "llama", "--recipe", recipe]) == 2  # no --data given
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert len(errors) == 1
    err = errors[0]
    assert err.startswith("error: compactnn deploy llama: ") and words in err
    assert f"`compactnn compress llama --recipe {command_recipe} --out DIR`" in err
    assert "`compactnn export DIR --list`" in err and "pass --data" not in err


@pytest.mark.parametrize(
    ("recipe", "kind"),
    [
        ("w4-g32-gptq", "weight-only"),
        ("w8", "weight-only"),
        ("w8a8", "static"),
        ("w8a8-smoothquant", "per-token"),
        ("w8a8d", "runtime"),
        ("w4a8g-g32-gptq", "runtime"),
        ("ch50-ft", None),
    ],
)
def test_recipe_kind(recipe, kind):
    assert recipe_kind(resolve_recipe(recipe)) == kind
