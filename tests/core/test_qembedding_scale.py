"""``embed_scale`` of a quantized token table: a finite number, refused otherwise."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qembedding import QuantEmbedding, checked_embed_scale, embedding_unsupported
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError

SPEC = QuantSpec(8, True, "channel")


@pytest.mark.parametrize(
    "value",
    [2.5, 3, -1.5, 0.0, torch.tensor(2.5), torch.tensor([2.5]), torch.tensor(2.5).half()],
)
def test_a_finite_factor_is_kept_and_multiplies_the_lookup(value):
    q = QuantEmbedding(6, 4, SPEC, embed_scale=value)
    factor = float(torch.as_tensor(value).float())
    assert checked_embed_scale(value) == factor and float(q.embed_scale) == factor
    q.set_quantized_weight(*_grid(q))
    ids = torch.tensor([0, 5, 2])
    assert torch.equal(q(ids), nn.functional.embedding(ids, q.weight) * torch.tensor(factor))


def _grid(q):
    from compactnn.core.qlayers import rtn_weight_qparams

    torch.manual_seed(0)
    return rtn_weight_qparams(torch.randn(q.num_embeddings, q.embedding_dim), SPEC)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (math.nan, "embed_scale=nan"),
        (math.inf, "embed_scale=inf"),
        (-math.inf, "embed_scale=-inf"),
        pytest.param(10**400, "embed_scale=inf", id="int-beyond-float"),
        (True, "embed_scale=True"),
        ("8.0", "embed_scale='8.0'"),
        ("\x1b[2J", "embed_scale='\\x1b[2J'"),
        ([8.0], "embed_scale=a list"),
        (torch.tensor([1.0, 2.0]), "float32 tensor of shape [2]"),
        (torch.tensor(8), "int64 tensor of shape []"),
        (torch.tensor(math.nan), "float32 tensor of shape []"),
    ],
)
def test_a_bad_factor_is_a_one_line_compactnn_error(value, named):
    with pytest.raises(CompactnnError) as info:
        QuantEmbedding(6, 4, SPEC, embed_scale=value)
    message = str(info.value)
    assert named in message and "not a finite number" in message
    assert "\n" not in message and "\x1b" not in message


class NanScaledWordEmbedding(nn.Embedding):
    """A BART-style scaled table (lookup * embed_scale) whose factor is NaN."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__(rows, dim)
        self.embed_scale = math.nan

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = NanScaledWordEmbedding(16, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nan_to_num(self.emb(ids)))


def test_a_table_with_a_non_finite_factor_stays_float_with_that_reason():
    torch.manual_seed(0)
    assert embedding_unsupported(NanScaledWordEmbedding(4, 2)) == (
        "its scale factor is not a finite number (nan)"
    )
    net = Net().eval()
    with pytest.warns(UserWarning):
        q = compactnn.compress(net, "w8", progress=False)
    assert type(q.emb) is NanScaledWordEmbedding  # not quantized
    reasons = " ".join(compactnn.info_of(q)["float_layers"].values())
    assert "its scale factor is not a finite number" in reasons
    assert "forward of its own" not in reasons
