"""The first/last-layer rule on models with several outputs: every layer whose output is
itself one of the model's outputs (a dict's or a tuple's) is a last layer too; a model with
one output keeps exactly its first and last layers."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import compactnn
from compactnn.quant.ends import model_ends, run_with_heads


class DictHeads(nn.Module):
    """A classifier beside an auxiliary head, returned in a dict (the aux head runs last)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        self.aux = nn.Linear(8, 2)

    def forward(self, x):
        f = F.relu(self.mid(F.relu(self.stem(x)))).mean((2, 3))
        return {"logits": self.fc(f), "aux": self.aux(f)}


class TupleHeads(nn.Module):
    """Logits computed before a segmentation map, returned as a tuple; ``proj``'s output is
    returned only reshaped, so it is no output layer."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)
        self.proj = nn.Linear(8, 4)
        self.seg = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        pooled = e.mean((2, 3))
        return self.head(pooled), self.proj(pooled).reshape(-1, 2, 2), self.seg(e)


def _bits(model, recipe="w4a8"):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(model.eval(), recipe, calib_data=x, progress=False)
    return {n: m.weight_spec.bits for n, m in q.named_modules() if hasattr(m, "weight_spec")}


def test_every_head_of_a_dict_output_keeps_8_bits():
    torch.manual_seed(0)
    assert _bits(DictHeads()) == {"stem": 8, "mid": 4, "fc": 8, "aux": 8}


def test_every_head_of_a_tuple_output_keeps_8_bits_and_a_reshaped_one_does_not():
    torch.manual_seed(0)
    assert _bits(TupleHeads()) == {"enc": 8, "head": 8, "proj": 4, "seg": 8}


def test_a_single_output_model_keeps_its_first_and_last_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    x = torch.randn(4, 8)
    ran, heads = run_with_heads(model, ["0", "2", "3"], lambda m: m(x))
    assert (ran, heads) == (["0", "2", "3"], {"3"})
    assert model_ends(["0", "2", "3"], ran, heads) == {"0", "3"}


def test_a_layer_that_never_ran_is_no_head():
    assert model_ends(["a", "b", "c"], [], {"b"}) == {"a", "c"}  # no data: registered order
