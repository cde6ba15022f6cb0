"""A float model and an input batch rebuilt in a fresh process from safetensors files and
trusted constructors, nothing unpickled (:mod:`compactnn.report.plain_model`)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compactnn.report.plain_model import RECORD, load_batch, rebuild_float, save_batch
from compactnn.report.resident import save_inputs


def test_the_float_model_is_rebuilt_by_trusted_constructors(tmp_path):
    """torch.nn and compactnn classes are rebuilt from data (attributes, shared modules,
    non-persistent buffers, frozen parameters kept); outputs equal the original's."""
    from compactnn.models.mnist_cnn import MnistCNN

    torch.manual_seed(0)
    mnist = MnistCNN().eval()
    with torch.no_grad():  # statistics other than a fresh model's
        for bn in (m for m in mnist.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    shared = nn.Linear(6, 6)
    net = nn.Sequential(nn.Conv1d(2, 3, 3, padding="same"), nn.Flatten(), nn.Linear(12, 6),
                        shared, nn.GELU(approximate="tanh"), shared).eval()  # fmt: skip
    net[2].weight.requires_grad_(False)
    net[0].register_buffer("scale", torch.tensor([2.0]), persistent=False)
    for model, x in ((mnist, torch.randn(2, 1, 28, 28)), (net, torch.randn(2, 2, 4))):
        model_path, batch_path = save_inputs(tmp_path / type(model).__name__, model, x)
        rebuilt = rebuild_float(model_path)
        assert type(rebuilt) is type(model) and not rebuilt.training
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x))
        assert torch.equal(load_batch(batch_path), x)
    assert rebuilt[3] is rebuilt[5] and not rebuilt[2].weight.requires_grad
    assert rebuilt[0].scale.item() == 2.0 and "scale" not in rebuilt.state_dict()
    assert rebuilt[0].padding == "same" and rebuilt[0].kernel_size == (3,)


FACTORY = """
from torch import nn

class Own(nn.Module):  # a class of the user's, not torch.nn's
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).relu()

def make():
    return Own()
"""


def test_a_user_class_is_rebuilt_only_from_the_model_the_user_named(tmp_path, monkeypatch):
    import importlib

    from safetensors.torch import save_file

    (tmp_path / "f3_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    own = importlib.import_module("f3_factory").make().eval()
    with pytest.raises(ValueError, match=r"Own is a f3_factory:Own, not a class of torch\.nn"):
        save_inputs(tmp_path / "a", own, torch.ones(2, 4))
    save_file(own.state_dict(), tmp_path / "w.safetensors")
    source = {"model": "f3_factory:make", "weights": str(tmp_path / "w.safetensors")}
    model_path, _ = save_inputs(tmp_path / "b", own, torch.ones(2, 4), source)
    rebuilt = rebuild_float(model_path, source)  # the parent's source, not the record's
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), own(x))


@pytest.mark.parametrize(
    "name, needle",
    [("os:system", "not from torch.nn or compactnn"),
     ("torch.nn.functional:relu", "not an nn.Module class"),
     ("torch.nn:modules.module.torch.fx.GraphModule", "defined in 'torch.fx"),
     ("torch.nn:modules.module.torch.ao.nn.quantized.Linear", "not a trusted package"),
     (("torch.nn.modules.linear:Linear", {"forward": "print"}), "'forward' of a Linear"),
     (("torch.nn.modules.linear:Linear", {"_forward_hooks": {}}), "'_forward_hooks'"),
     (("torch.nn.modules.linear:Linear", {"__class__": "x"}), "'__class__'")],
)  # fmt: skip
def test_a_record_naming_other_code_is_refused(tmp_path, name, needle):
    """A forged record can neither walk a dotted path out of the trusted packages nor set a
    method, a hook table or a dunder through its plain-data attributes."""
    from safetensors.torch import save_file

    name, attrs = name if isinstance(name, tuple) else (name, {})
    node = {"class": name, "training": False, "attrs": attrs, "params": {}, "buffers": {},
            "volatile": [], "children": {}}  # fmt: skip
    record = {"route": "modules", "nodes": [node]}
    path = tmp_path / "float.safetensors"
    save_file({"0": torch.zeros(1)}, path, metadata={RECORD: json.dumps(record)})
    with pytest.raises(ValueError, match=needle):
        rebuild_float(str(path))


def test_batches_keep_their_form_and_a_non_tensor_is_refused(tmp_path):
    x, m = torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long)
    for i, batch in enumerate([x, (x, m), [x], {"input_ids": m, "attention_mask": m[:, :2]}]):
        save_batch(tmp_path / f"{i}.safetensors", batch)
        back = load_batch(str(tmp_path / f"{i}.safetensors"))
        assert type(back) is type(batch)
        pairs = batch.items() if isinstance(batch, dict) else enumerate([batch])
        got = back.items() if isinstance(back, dict) else enumerate([back])
        for (k, a), (j, b) in zip(pairs, got, strict=True):
            assert k == j and all(map(torch.equal, a if isinstance(a, list | tuple) else [a],
                                      b if isinstance(b, list | tuple) else [b]))  # fmt: skip
    with pytest.raises(ValueError, match="'mask' is not a tensor"):
        save_batch(tmp_path / "bad.safetensors", {"x": x, "mask": None})


def test_a_hugging_face_model_is_rebuilt_from_its_config_and_state(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    bert = transformers.BertForMaskedLM(config).eval()  # decoder tied to the embeddings
    ids = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8).long()}
    model_path, _ = save_inputs(tmp_path, bert, ids)
    rebuilt = rebuild_float(model_path)
    with torch.no_grad():
        assert torch.equal(rebuilt(**ids).logits, bert(**ids).logits)
    assert rebuilt.cls.predictions.decoder.weight is rebuilt.bert.embeddings.word_embeddings.weight
