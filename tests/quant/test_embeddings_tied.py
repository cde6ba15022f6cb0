import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import compactnn
from compactnn.core.modules import Targets
from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import QuantLinear
from compactnn.errors import ArtifactError
from compactnn.export.size import artifact_size
from compactnn.quant.base import short_act_spec, short_weight_spec
from compactnn.quant.rtn import RTNConfig
from compactnn.recipe import Recipe, Step


class TinyLM(nn.Module):
    """Token embedding -> two Linears -> head (tied to the embedding or not)."""

    def __init__(self, tied: bool, vocab: int = 96, dim: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(16, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


def _model(tied: bool) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(tied).eval()


IDS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))


def _compress(model, recipe, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compactnn.compress(model, recipe, calib_data=IDS, progress=False, **kw)


def test_weight_only_recipe_quantizes_the_tables_with_rtn():
    m = _model(tied=False)
    q = _compress(m, "w4-g32")
    assert isinstance(q.tok, QuantEmbedding) and isinstance(q.pos, QuantEmbedding)
    assert q.tok.format == "uint4-asym-group32"
    # an independent RTN of the float table: min-max per row group of 32
    w = m.tok.weight.detach().reshape(96, 2, 32)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    torch.testing.assert_close(q.tok.weight_scale, (hi - lo) / 15, rtol=1e-3, atol=1e-7)
    err = (q.tok.weight.reshape(96, 2, 32) - w).abs()
    assert (err <= q.tok.weight_scale[..., None] + 1e-6).all()
    assert "tok" not in q._compactnn["float_layers"]
    assert q.pos.format == "int8-sym-channel"  # the small position table: 8 bits per row
    # the head (last layer) keeps its 8-bit convention, untied: its own codes
    assert isinstance(q.head, QuantLinear) and q.head.weight_spec.bits == 8


def test_opt_out_keeps_the_tables_float():
    m = _model(tied=False)
    q = _compress(m, "w4-g32", ignore=["tok", "pos"])
    assert type(q.tok) is nn.Embedding and torch.equal(q.tok.weight, m.tok.weight)
    linear_only = Recipe(
        "lin",
        [Step("rtn", RTNConfig(weight=short_weight_spec(4, 32)), Targets(classes=("Linear",)))],
    )
    q2 = _compress(m, linear_only)
    assert type(q2.tok) is nn.Embedding and isinstance(q2.fc1, QuantLinear)


def test_activation_recipes_leave_tables_float_unless_the_step_names_embedding():
    m = _model(tied=False)
    assert type(_compress(m, "w8a8").tok) is nn.Embedding
    cfg = RTNConfig(weight=short_weight_spec(8), act=short_act_spec(8))
    named = Recipe("e", [Step("rtn", cfg, Targets(classes=("Linear", "Embedding")))])
    q = _compress(m, named)
    assert isinstance(q.tok, QuantEmbedding) and q.tok.format == "int8-sym-channel"
    assert not hasattr(q.tok, "input_quantizer")


def test_tied_head_shares_the_table_codes_and_stays_tied_after_load(tmp_path):
    m = _model(tied=True)
    q = _compress(m, "w4-g32")
    assert isinstance(q.tok, QuantEmbedding) and isinstance(q.head, QuantLinear)
    assert q.head.weight is q.tok.weight and q.head.weight_codes is q.tok.weight_codes
    assert q.tok.weight_spec.bits == 8  # the head's first/last convention sets the table's grid
    with torch.no_grad():  # the head is the table: logits = h @ dequantized table.T
        h = q.tok(IDS) + q.pos(torch.arange(16))
        h = h + q.fc2(torch.relu(q.fc1(h)))
        torch.testing.assert_close(q(IDS), h @ q.tok.weight.T, rtol=0, atol=0)
    compactnn.save(q, tmp_path / "q")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert "tok.weight.packed" in stored
    assert not any(k.startswith("head.") for k in stored)  # the codes once
    loaded = compactnn.load(tmp_path / "q", model=_model(tied=True))
    assert loaded.head.weight is loaded.tok.weight
    assert loaded.head.weight_codes is loaded.tok.weight_codes
    with torch.no_grad():
        assert torch.equal(loaded(IDS), q(IDS))
    compactnn.save(m, tmp_path / "f")
    assert artifact_size(tmp_path / "q") < artifact_size(tmp_path / "f") / 2.5


def test_tied_head_with_activation_quantization_round_trips(tmp_path):
    m = _model(tied=True)
    cfg = RTNConfig(weight=short_weight_spec(8), act=short_act_spec(8))
    q = _compress(m, Recipe("e", [Step("rtn", cfg)]))  # w8a8: the tie pulls the table in
    assert isinstance(q.tok, QuantEmbedding) and q.head.input_quantizer.calibrated
    compactnn.save(q, tmp_path / "q")
    loaded = compactnn.load(tmp_path / "q", model=_model(tied=True))
    assert loaded.head.weight_codes is loaded.tok.weight_codes
    with torch.no_grad():
        assert torch.equal(loaded(IDS), q(IDS))


def test_ignoring_a_tied_table_keeps_the_pair_float():
    m = _model(tied=True)
    q = _compress(m, "w4-g32", ignore=["tok"])
    assert type(q.tok) is nn.Embedding and type(q.head) is nn.Linear
    assert q.head.weight is q.tok.weight
    assert "tok" in q._compactnn["float_layers"]["head"]


def test_edited_table_entry_is_refused(tmp_path):
    q = _compress(_model(tied=True), "w4-g32")
    compactnn.save(q, tmp_path / "q")
    hp = tmp_path / "q" / "compactnn.json"
    header = json.loads(hp.read_text())
    header["extra"]["quant_embeddings"]["tok"]["shape"] = [97, 64]
    from compactnn.export.validate import header_digest

    header["digest"] = header_digest(header)
    hp.write_text(json.dumps(header))
    with pytest.raises(ArtifactError, match="embedding"):
        compactnn.load(tmp_path / "q", model=_model(tied=True))


class TwoTowerLM(TinyLM):
    """An encoder and a decoder table holding the token table's weight (as T5 and BART do)."""

    def __init__(self) -> None:
        super().__init__(tied=True)
        self.dec = nn.Embedding(96, 64)
        self.dec.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + self.head(self.dec(ids))


def test_tables_sharing_a_weight_become_one_module_stored_once(tmp_path):
    torch.manual_seed(0)
    m = TwoTowerLM().eval()
    q = _compress(m, "w4-g32")
    assert q.dec is q.tok and isinstance(q.tok, QuantEmbedding)
    assert q.head.weight_codes is q.tok.weight_codes
    compactnn.save(q, tmp_path / "a")
    stored = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert not [k for k in stored if k.startswith("dec.")]
    torch.manual_seed(1)
    loaded = compactnn.load(tmp_path / "a", model=TwoTowerLM())
    assert loaded.dec is loaded.tok
    assert torch.equal(loaded(IDS), q(IDS))


def test_ignoring_one_of_tables_sharing_a_weight_keeps_them_all_float():
    torch.manual_seed(0)
    q = _compress(TwoTowerLM().eval(), "w4-g32", ignore=["dec"])
    assert type(q.tok) is nn.Embedding and type(q.dec) is nn.Embedding
    assert q.dec.weight is q.tok.weight is q.head.weight
    floats = q._compactnn["float_layers"]
    assert "dec" in floats["tok"] and "dec" in floats["head"]
