"""A head tied to its token table, split across two steps: the reason names the fix."""

import warnings

import torch
from torch import nn

import compactnn
from compactnn.core.modules import Targets
from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import QuantLinear
from compactnn.quant.base import short_weight_spec
from compactnn.quant.rtn import RTNConfig
from compactnn.recipe import Recipe, Step


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 96, dim: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.tok(ids))))


IDS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))


def _head8(names: list[str]) -> Recipe:
    """The docs' ``w4-gptq-lmhead8`` shape: ``names`` at 8 bits, the rest at 4 bits."""
    return Recipe(
        "lmhead8",
        [
            Step("rtn", RTNConfig(weight=short_weight_spec(8, None)), Targets(names=tuple(names))),
            Step("rtn", RTNConfig(weight=short_weight_spec(4, 32)), Targets(ignore=tuple(names))),
        ],
    )


def _compress(recipe: Recipe) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = compactnn.compress(TiedLM().eval(), recipe, calib_data=IDS, progress=False)
    return q, [str(w.message) for w in caught]


def test_head_named_without_its_table_says_to_name_both():
    q, caught = _compress(_head8(["head"]))
    floats = q._compactnn["float_layers"]
    assert type(q.head) is nn.Linear and type(q.tok) is nn.Embedding
    fix = "so both stay float: name head, tok in one step's targets"
    assert floats["head"].startswith("tied to tok, which the step leaves out, " + fix)
    assert floats["tok"].startswith("tied to head, which the step leaves out, " + fix)
    (kept,) = [m for m in caught if m.startswith("kept in float:")]
    assert "leaves in float" not in kept and kept.count(fix) == 2


def test_naming_both_quantizes_the_pair_as_one_table():
    q, caught = _compress(_head8(["head", "tok"]))
    assert q._compactnn["float_layers"] == {}
    assert isinstance(q.tok, QuantEmbedding) and isinstance(q.head, QuantLinear)
    assert q.tok.format == "int8-sym-channel"
    assert q.head.weight_codes is q.tok.weight_codes  # still tied: one table
    assert not [m for m in caught if m.startswith("kept in float:")]
