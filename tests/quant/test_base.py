"""Activation calibration (quant/base.py): layers the calibration never reaches."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.quant.base import QuantConfig


class _Unused(nn.Module):
    """A model with a linear layer its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.spare = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(x)


def test_a_layer_the_calibration_never_reaches_is_named():
    torch.manual_seed(0)
    model = _Unused().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unreached = r"never ran on the calibration data.*unknown: spare\."
    with pytest.raises(compactnn.CompactnnError, match=unreached):
        compactnn.compress(model, "w8a8", calib_data=torch.randn(4, 64), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # weight-only recipes need no activation ranges: the same model compresses
    q = compactnn.compress(model, "w4-g32", calib_data=torch.randn(4, 64), progress=False)
    assert q(torch.randn(2, 64)).shape == (2, 4)


def test_the_unreached_layer_can_be_excluded_as_the_error_says():
    import dataclasses

    from compactnn.core.modules import Targets
    from compactnn.recipe import resolve_recipe

    torch.manual_seed(0)
    recipe = resolve_recipe("w8a8")
    steps = tuple(
        dataclasses.replace(
            s, targets=dataclasses.replace(s.targets or Targets(), ignore=("spare",))
        )
        for s in recipe.steps
    )
    q = compactnn.compress(
        _Unused().eval(), dataclasses.replace(recipe, steps=steps), calib_data=torch.randn(4, 64),
        progress=False,
    )  # fmt: skip
    assert type(q.spare) is nn.Linear and type(q.fc) is not nn.Linear


def test_yaml_act_without_granularity_is_per_tensor():
    from compactnn.recipe import Recipe

    data = {"steps": [{"method": "rtn", "config": {"act": {"bits": 4}}}]}
    config = Recipe.from_dict(data).steps[0].config
    assert config.act.granularity == "tensor" and config.act.bits == 4
    assert config.weight == QuantConfig().weight  # other defaults untouched


def test_yaml_act_channel_granularity_is_refused_with_its_path():
    from compactnn.recipe import Recipe

    data = {"steps": [{"method": "rtn", "config": {"act": {"bits": 4, "granularity": "channel"}}}]}
    with pytest.raises(CompactnnError, match=r"steps\[0\]\.config\.act\.granularity"):
        Recipe.from_dict(data)


def test_python_act_without_granularity_is_per_tensor_like_yaml():
    from compactnn.core.spec import QuantSpec
    from compactnn.quant.rtn import RTNConfig

    config = RTNConfig(act=QuantSpec(bits=4, symmetric=False))
    assert config.act.granularity == "tensor" and config.act.bits == 4
    assert config.act == QuantConfig.from_dict({"act": {"bits": 4, "symmetric": False}}).act
    # weights keep their own default, per output channel
    assert RTNConfig(weight=QuantSpec(bits=4)).weight.granularity == "channel"
    assert QuantSpec(bits=4).granularity == "channel"
    # an explicit per-channel activation is still refused
    with pytest.raises(CompactnnError, match="per-tensor"):
        QuantConfig(act=QuantSpec(bits=4, granularity="channel"))


# --- first_last_bits: the model's first and last quantizable layers, whatever the step ---


class _ThreeConvTwoFC(nn.Module):
    """c1 -> c2 -> c3 -> pool -> fc1 -> fc2, registered head first (so registration order
    is not execution order)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc2 = nn.Linear(16, 4)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(32, 16)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class _TinyTransformer(nn.Module):
    """embedding -> one attention + MLP block -> norm -> lm_head (untied or tied)."""

    def __init__(self, tied: bool = False, vocab: int = 32, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4, -1) @ self.v(h)
        h = h + self.o(att)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(self.norm(h))


_X = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
_IDS = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
_W4 = "weight: {bits: 4, symmetric: false}"
_A4 = "act: {bits: 4, symmetric: false}"


def _cnn() -> _ThreeConvTwoFC:
    torch.manual_seed(0)
    return _ThreeConvTwoFC().eval()


def _yaml(*steps: tuple[str, str]) -> str:
    """A recipe of rtn steps, each ``(targets, config)`` as YAML flow mappings."""
    body = "".join(
        f"  - method: rtn\n    targets: {{{t}}}\n    config: {{{c}, first_last_bits: 8}}\n"
        for t, c in steps
    )
    return "name: steps\nsteps:\n" + body


def _compress(model, recipe, data):
    import warnings

    from compactnn.recipe import Recipe

    if isinstance(recipe, str) and recipe.startswith("name:"):
        recipe = Recipe.from_yaml(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compactnn.compress(model, recipe, calib_data=data, progress=False)


def _bits(q) -> dict[str, tuple[int, int | None]]:
    """Weight bits and input-activation bits of every quantized layer."""
    from compactnn.core.qlayers import is_quant_layer

    out = {}
    for n, m in q.named_modules():
        if is_quant_layer(m):
            aq = getattr(m, "input_quantizer", None)
            out[n] = (m.weight_spec.bits, aq.spec.bits if aq is not None else None)
    return out


def _promoted(q, low: int) -> set[str]:
    return {n for n, (w, a) in _bits(q).items() if w > low or (a or 0) > low}


def test_two_steps_promote_the_models_first_and_last_layers_only():
    # conv step then linear step: c1 (first to run) and fc2 (last), not c3 and fc1, where
    # the steps happen to end and start
    two = _yaml(("classes: [Conv2d]", f"{_W4}, {_A4}"), ("classes: [Linear]", f"{_W4}, {_A4}"))
    q = _compress(_cnn(), two, _X)
    assert _bits(q) == {
        "c1": (8, 8), "c2": (4, 4), "c3": (4, 4), "fc1": (4, 4), "fc2": (8, 8),
    }  # fmt: skip
    # weight-only, the split changes nothing: the same codes as one step over every layer
    w4 = _yaml(("classes: [Conv2d]", _W4), ("classes: [Linear]", _W4))
    split, whole = _compress(_cnn(), w4, _X), _compress(_cnn(), _yaml(("names: ['*']", _W4)), _X)
    assert _promoted(split, 4) == {"c1", "fc2"}
    for name in ("c1", "c2", "c3", "fc1", "fc2"):
        a, b = getattr(split, name), getattr(whole, name)
        assert a.weight_spec == b.weight_spec and torch.equal(a.weight_codes, b.weight_codes)


def test_a_step_that_skips_the_ends_promotes_no_middle_layer():
    q = _compress(_cnn(), _yaml(("names: [c2, c3, fc1]", _W4)), _X)
    assert _bits(q) == {"c2": (4, None), "c3": (4, None), "fc1": (4, None)}
    # the ends quantized by a later step get the convention there
    rest = _yaml(("names: [c2, c3, fc1]", _W4), ("names: [c1, fc2]", _W4))
    assert _promoted(_compress(_cnn(), rest, _X), 4) == {"c1", "fc2"}


def test_without_data_the_ends_are_the_first_and_last_registered():
    q = _compress(_cnn(), _yaml(("classes: [Conv2d]", _W4), ("classes: [Linear]", _W4)), None)
    assert _promoted(q, 4) == {"fc2", "c2"}  # registration: fc2, c3, c1, fc1, c2


def test_a_layer_the_forward_never_runs_is_neither_first_nor_last():
    q = _compress(_Unused().eval(), "w4-g32", torch.randn(4, 64))
    assert _bits(q) == {"fc": (8, None), "spare": (4, None)}


@pytest.mark.parametrize("recipe", ["w4a4", "w2a2-lsq"])
def test_single_step_recipes_promote_the_first_and_last_layers(recipe):
    low = int(recipe[1])
    assert _promoted(_compress(_cnn(), recipe, _X), low) == {"c1", "fc2"}
    torch.manual_seed(0)
    lm = _compress(_TinyTransformer().eval(), recipe, _IDS)
    assert _promoted(lm, low) == {"q", "lm_head"}
    assert all(_bits(lm)[n] == (low, low) for n in ("k", "v", "o", "up", "down"))


def test_a_tied_head_is_the_last_layer_so_the_one_before_it_stays_low():
    torch.manual_seed(0)
    q = _compress(_TinyTransformer(tied=True).eval(), "w4a4", _IDS)
    assert _promoted(q, 4) == {"q", "lm_head"}  # down, before the head, is a middle layer
    assert q.lm_head.weight_codes is q.embed.weight_codes


def test_a_group_size_that_does_not_divide_is_named_alike_by_every_engine():
    import compactnn
    from compactnn.errors import CompactnnError
    from compactnn.models.tiny_hf import tiny_model

    model, calib = tiny_model("llama")
    k = model.model.layers[0].self_attn.q_proj.in_features
    messages = []
    for recipe in ("w4-g48", "w4-g48-gptq"):  # layerwise RTN, sequential GPTQ
        with pytest.raises(CompactnnError) as info:
            compactnn.compress(model, recipe, calib_data=calib, progress=False)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    fits = max(g for g in (8, 16, 32, 64, 128) if k % g == 0)
    assert messages[0].startswith("group_size=48 does not divide the input dimension of ")
    assert f"q_proj ({k})" in messages[0] and f"group_size={fits} divides every one" in messages[0]


def test_the_group_size_a_message_names_fits_every_layer_or_none_is_named():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    x = torch.randn(8, 96)
    with pytest.raises(CompactnnError, match=r"1 layer: 2 \(64\)\.") as info:
        compactnn.compress(mlp, "w4-g48", calib_data=x, progress=False)  # 48 divides 96 only
    fits = int(re.search(r"group_size=(\d+) divides every one", str(info.value))[1])
    assert 96 % fits == 0 and 64 % fits == 0 and fits == 32  # gcd 32, not the bad layer's 64
    q = compactnn.compress(mlp, f"w4-g{fits}", calib_data=x, progress=False)  # it does work
    assert q[0].weight_spec.group_size == fits
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 4))
    with pytest.raises(CompactnnError) as info:
        compactnn.compress(cnn, "w4-g16", calib_data=torch.randn(8, 1, 6, 6), progress=False)
    message = str(info.value)
    assert "0 (9)" in message and "divides every one" not in message
    assert f"greatest common divisor is {math.gcd(9, 64)})" in message
    assert "No group size of 8 to 128 divides" in message and "per-channel" in message


class XScaledWordEmbedding(nn.Embedding):
    """A scaled token table as Hugging Face writes them: the lookup times ``embed_scale``."""

    def __init__(self, rows: int, dim: int, embed_scale: float) -> None:
        super().__init__(rows, dim)
        self.embed_scale = embed_scale

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class _SharedTable(nn.Module):
    """Two scaled tables holding one weight (as BART's encoder and decoder), then a head."""

    def __init__(self, enc_scale: float, dec_scale: float) -> None:
        super().__init__()
        self.enc = XScaledWordEmbedding(32, 16, enc_scale)
        self.dec = XScaledWordEmbedding(32, 16, dec_scale)
        self.dec.weight = self.enc.weight
        self.fc = nn.Linear(16, 4)

    def forward(self, ids):
        return self.fc(self.enc(ids) + self.dec(ids))


def test_tables_sharing_a_weight_with_different_factors_are_refused():
    """One quantized table serves every module sharing the weight, with one factor: a group
    whose factors differ is refused by name, not given the first module's factor."""
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (8, 5))
    with pytest.raises(CompactnnError, match=r"enc \(embed_scale 2.0\), dec \(embed_scale 3.0\)"):
        compactnn.compress(_SharedTable(2.0, 3.0), "w8", calib_data=ids, progress=False)
    q = compactnn.compress(_SharedTable(2.0, 2.0), "w8", calib_data=ids, progress=False)
    assert q.enc is q.dec and float(q.enc.embed_scale) == 2.0
    want = nn.functional.embedding(ids, q.enc.weight) * 2.0  # the dequantized table, scaled
    torch.testing.assert_close(q.enc(ids), want, rtol=0, atol=0)
