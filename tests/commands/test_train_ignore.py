"""``compactnn train`` on a practitioner's own model: ``--ignore`` (as compress has it), the
float layers an artifact records, and models that return a dict or a tuple."""

import json

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main

FACTORY = """
import torch
from torch import nn


def seq():
    # a Conv1d between the first and the last layer: a binary block cannot wrap it
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(),
        nn.Conv1d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 16, 3),
    )


class Outputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        f = self.body(x)
        logits = self.head(f)
        if self.kind == "dict":
            return {"logits": logits, "feat": f}
        return (logits, f) if self.kind == "tuple" else logits


def plain():
    return Outputs("plain")


def dictout():
    return Outputs("dict")


def tupleout():
    return Outputs("tuple")
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "train_ignore_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import train_ignore_factory as factory

    for name in ("seq", "plain"):
        save_file(getattr(factory, name)().state_dict(), f"{name}.safetensors")
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (96,), generator=gen)
    x = torch.randn(96, 2, 16, generator=gen) + y[:, None, None]  # learnable
    save_file({"x": x, "y": y}, "data.safetensors")
    return factory


def _train(model, weights, recipe, out, *extra):
    return main(
        ["train", f"train_ignore_factory:{model}", "--weights", weights, "--recipe", recipe,
         "--data", "data.safetensors", "--epochs", "1", "--out", out, "--no-progress", *extra]
    )  # fmt: skip


def test_a_layer_binary_training_cannot_take_is_named_with_the_ignore_fix(project, capsys):
    assert _train("seq", "seq.safetensors", "w1a1-reactnet", "a") == 2
    err = capsys.readouterr().err
    assert "layer '2' (Conv1d) cannot take 1-bit activations" in err
    assert "Leave it in float with --ignore 2 (or the recipe's targets.ignore)" in err
    assert "Exclude it from the recipe's targets" not in err and "ignore=[" not in err


def test_ignore_leaves_the_layer_in_float_and_the_artifact_records_it(project, capsys):
    """``--ignore 2`` as compress takes it: the layer is kept in float, and the artifact's
    float_layers say so with compress's reason (it recorded ``{}`` before)."""
    assert _train("seq", "seq.safetensors", "w1a1-reactnet", "a", "--ignore", "2") == 0
    capsys.readouterr()
    header = json.loads(open("a/compactnn.json").read())
    assert header["float_layers"] == {"2": "not targeted by the recipe"}
    q = compactnn.load("a", model=project.seq())
    assert type(q[2]) is torch.nn.Conv1d  # float, as it was
    assert compactnn.info_of(q)["recipe"].steps[0].targets.ignore == ("2", "2.*")


def test_a_recipe_that_ignores_a_layer_records_it_as_kept_in_float(project, capsys):
    """A recipe's own ``targets.ignore`` (no --ignore): the ignored layer is recorded as kept
    in float, as compress records it."""
    yaml = compactnn.resolve_recipe("w2a8-ttq").to_yaml().replace("ignore: []", "ignore: [head]")
    open("ttq_ign.yaml", "w").write(yaml.replace("name: w2a8-ttq", "name: ttq-ign"))
    assert _train("plain", "plain.safetensors", "ttq_ign.yaml", "b") == 0
    capsys.readouterr()
    header = json.loads(open("b/compactnn.json").read())
    assert header["float_layers"] == {"head": "not targeted by the recipe"}
    ptq = compactnn.compress(project.plain(), "ttq_ign.yaml", calib_data=torch.randn(8, 2, 16))
    assert compactnn.info_of(ptq)["float_layers"] == header["float_layers"]  # as compress


@pytest.mark.parametrize("kind", ["dictout", "tupleout"])
def test_a_model_returning_a_dict_or_tuple_trains_on_its_logits(project, capsys, kind):
    """Trained on its logits (a dict's "logits", a tuple's first item) as eval scores them:
    the same run, to the bit, as the model returning its logits alone."""
    assert _train("plain", "plain.safetensors", "w2a8-ttq", "plain") == 0
    assert _train(kind, "plain.safetensors", "w2a8-ttq", kind) == 0
    out = capsys.readouterr().out
    log = [open(f"{n}.training.jsonl").read().splitlines() for n in ("plain", kind)]
    strip = [[{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in x] for x in log]
    assert strip[0] == strip[1] and strip[0][0]["train_loss"] > 0
    q = compactnn.load(kind, model=getattr(project, kind)())
    ref = compactnn.load("plain", model=project.plain())
    x = torch.randn(4, 2, 16)
    got = q(x)
    logits = got["logits"] if kind == "dictout" else got[0]
    assert torch.equal(logits, ref(x))
    assert f"trained train_ignore_factory:{kind} with w2a8-ttq for 1 epoch" in out


def test_several_layers_are_named_as_one_ignore_flag_each():
    from compactnn.commands.train import _ignore_words
    from compactnn.engines.binary_checks import check_binary_layers
    from compactnn.errors import CompactnnError

    convs = {"c2": torch.nn.Conv1d(2, 2, 3), "c3": torch.nn.Conv1d(2, 2, 3)}
    with pytest.raises(CompactnnError) as info:
        check_binary_layers(convs)
    text = str(_ignore_words(info.value))
    assert (
        "Leave them in float with --ignore c2 --ignore c3 (or the recipe's targets.ignore)" in text
    )
    assert "ignore=[" not in text
