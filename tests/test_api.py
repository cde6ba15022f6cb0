import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qlayers import QuantConv2d, QuantLinear
from compactnn.errors import CompactnnError
from tests._rtn import rtn_int8


def small_cnn():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    for mod in m:
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def test_compress_returns_new_model_and_leaves_input_untouched():
    m = small_cnn()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(16, 1, 8, 8)
    q = compactnn.compress(m, "w4a8", calib_data=x, progress=False)
    assert q is not m
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert isinstance(m[1], nn.BatchNorm2d)
    assert isinstance(q[0], QuantConv2d) and isinstance(q[8], QuantLinear)
    # first and last layers keep 8 bits, the middle one gets 4
    assert q[0].weight_spec.bits == 8 and q[8].weight_spec.bits == 8
    assert q[3].weight_spec.bits == 4
    assert q[3].input_quantizer.qtype.bits == 8


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w1a1-xnor"])
def test_every_module_of_a_compressed_model_is_in_eval_mode(recipe):
    """The layers and quantizers a method creates start in training mode (nn.Module's
    default); the returned model is in eval mode through and through."""
    q = compactnn.compress(small_cnn(), recipe, calib_data=torch.randn(16, 1, 8, 8), progress=False)
    made = [n for n, m in q.named_modules() if m.training]
    assert not made, made


def test_w8a8_is_close_to_float():
    m = small_cnn()
    x = torch.randn(64, 1, 8, 8)
    q = compactnn.compress(m, "w8a8", calib_data=x, progress=False)
    ref, out = m(x), q(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    assert sqnr > 30


@pytest.mark.parametrize("kind", ["tensor", "list", "tuples", "dicts"])
def test_calib_data_forms(kind):
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, pixels):
            return self.net(pixels)

    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    model = DictNet() if kind == "dicts" else small_cnn()
    data = {
        "tensor": x,
        "list": [x[:16], x[16:]],
        "tuples": [(x[:16], y[:16]), (x[16:], y[16:])],  # DataLoader-style (inputs, labels)
        "dicts": [{"pixels": x[:16]}, {"pixels": x[16:]}],
    }[kind]
    q = compactnn.compress(model, "w8a8", calib_data=data, progress=False)
    out = q(pixels=x) if kind == "dicts" else q(x)
    assert out.shape == (32, 10)


def test_wrong_calibration_shape_names_expected_shape():
    with pytest.raises(CompactnnError, match=r"C=1"):
        compactnn.compress(small_cnn(), "w8a8", calib_data=torch.randn(4, 3, 8, 8), progress=False)


def test_activation_recipe_without_data_is_a_clear_error():
    with pytest.raises(CompactnnError, match="calib_data"):
        compactnn.compress(small_cnn(), "w8a8", progress=False)


def test_unquantizable_targets_stay_float_with_one_warning():
    from compactnn.core.modules import Targets
    from compactnn.core.spec import QuantSpec
    from compactnn.quant.rtn import RTNConfig
    from compactnn.recipe import Recipe, Step

    m = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(2 * 8, 4))
    recipe = Recipe(
        "r",
        (
            Step(
                "rtn",
                RTNConfig(weight=QuantSpec(bits=4, symmetric=False)),
                Targets(classes=("Conv3d", "Linear")),
            ),
        ),
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = compactnn.compress(m, recipe, progress=False)
    msgs = [str(w.message) for w in rec if "kept in float" in str(w.message)]
    assert len(msgs) == 1 and "0 (Conv3d" in msgs[0]
    assert compactnn.info_of(q)["float_layers"]["0"].startswith("Conv3d")


def test_pruned_float_layers_are_compressed_not_untargeted():
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    q = compactnn.compress(m, "sp50", progress=False)
    assert compactnn.info_of(q)["float_layers"] == {}  # both pruned: none left in float
    q = compactnn.compress(m, "sp50", progress=False, ignore=["2"])
    assert compactnn.info_of(q)["float_layers"] == {"2": "not targeted by the recipe"}


def test_weight_only_needs_no_data_and_group_error_names_layer():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    q = compactnn.compress(m, "w4-g32", progress=False)
    assert q[0].weight_spec.group_size == 32
    with pytest.raises(CompactnnError, match=r"group_size=48 .* 2 layers: 0 \(64\), 2 \(64\)"):
        compactnn.compress(m, "w4-g48", progress=False)


def test_ignore_keeps_the_named_layer_float_in_every_step():
    m, x = small_cnn(), torch.randn(8, 1, 8, 8)
    q = compactnn.compress(m, "w8a8", calib_data=x, progress=False, ignore=["0"])
    assert type(q[0]) is nn.Conv2d  # float (its batch norm folded into it, as for any layer)
    assert "0" in compactnn.info_of(q)["float_layers"]
    assert isinstance(q[3], QuantConv2d) and isinstance(q[8], QuantLinear)
    assert compactnn.info_of(q)["recipe"].steps[0].targets.ignore == ("0", "0.*")
    # nm2:4 on the 1x3x3 stem (9 inputs) warns that it stays dense; ignoring it is silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = compactnn.compress(m, "nm2:4", calib_data=x, progress=False, ignore="0")
    assert torch.equal(p[0].weight, m[0].weight)
    w = p[3].weight.detach().reshape(16, -1, 4)  # (out, groups of 4 inputs, 4)
    assert torch.equal((w != 0).sum(-1), torch.full((16, 18), 2))


def test_ignore_under_channel_pruning_keeps_the_layers_whole_shape(tmp_path):
    # ignore= kept only the layer's output channels: "2" went (8, 8, 3, 3) -> (8, 4, 3, 3)
    # as "0", which feeds it, was pruned; now "2" is untouched and "4" is still pruned
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    x = torch.randn(4, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(m, "ch50", calib_data=x, progress=False, ignore=["2"])
    assert torch.equal(q[2].weight, m[2].weight) and torch.equal(q[2].bias, m[2].bias)
    assert q[0].weight.shape == (8, 1, 3, 3) and q[4].weight.shape == (8, 8, 3, 3)
    assert q(x).shape == (4, 10)
    assert compactnn.info_of(q)["recipe"].steps[0].config.keep_whole == ("2",)
    compactnn.save(q, tmp_path / "a")
    assert torch.equal(compactnn.load(tmp_path / "a", model=m)(x), q(x))


def test_ignore_of_a_container_covers_its_children_and_bad_names_are_refused():
    m = nn.Sequential()
    m.add_module("stem", nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    m.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3)))
    q = compactnn.compress(m, "w8", progress=False, ignore=["stem"])
    assert type(q.stem[0]) is nn.Conv2d and isinstance(q.head[1], QuantLinear)
    with pytest.raises(CompactnnError, match=r"ignore: 'stemm' matches no module.*stem"):
        compactnn.compress(m, "w8", progress=False, ignore=["stemm"])
    with pytest.raises(CompactnnError, match=r"ignore: 'conv1' matches no module.*stem\.0"):
        compactnn.compress(m, "w8", progress=False, ignore=["conv1"])
    with pytest.raises(CompactnnError, match="must be a list of module names"):
        compactnn.compress(m, "w8", progress=False, ignore=[3])


class _EmbedNet(nn.Module):
    """A 1000x64 embedding (256,000 B) in front of a 64x8 linear (2,048 + 32 B)."""

    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.fc = nn.Linear(64, 8)
        self.head = nn.Linear(64, 1000, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        return self.fc(h), self.head(h)


def test_float_weight_bytes_counts_by_hand():
    from compactnn.float_layers import float_weight_bytes

    torch.manual_seed(0)
    q = compactnn.compress(_EmbedNet(), "w8", progress=False, ignore=["head", "emb"])
    kept, total, by_name = float_weight_bytes(q)
    # float: emb 256,000 + fc.bias 32 + head 256,000; quantized: fc.weight 2,048
    assert (kept, total) == (512_032, 514_080)
    assert set(by_name) == {"emb.weight", "fc.bias", "head.weight"}
    tied = compactnn.compress(_EmbedNet(tie=True), "w8", progress=False, ignore=["head"])
    assert float_weight_bytes(tied)[:2] == (256_032, 258_080)  # the tied matrix once


def test_warns_when_most_weight_bytes_stay_float():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"100% of the weight bytes stay in float.*emb\.weight"):
        q = compactnn.compress(_EmbedNet(), "w8", progress=False, ignore=["head", "emb"])
    assert any("stay in float" in n for n in compactnn.info_of(q)["notes"])


def test_no_float_bytes_warning_when_the_weights_are_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compactnn.compress(model, "w8", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"seed": "a"}, "seed='a': pass an integer"), ({"inplace": "yes"}, "inplace='yes'"),
     ({"progress": None}, "progress=None: pass True or False")],
)  # fmt: skip
def test_argument_types_are_checked(kwargs, match):
    with pytest.raises(CompactnnError, match=match):
        compactnn.compress(nn.Linear(4, 2), "w8", **kwargs)


def test_a_recipe_whose_target_names_match_nothing_is_refused_with_close_names(tmp_path):
    m = nn.Sequential()
    m.add_module("stem", nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    m.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3)))
    path = tmp_path / "r.yaml"
    path.write_text("steps: [{method: rtn, targets: {names: [stemm]}}]\n")
    with pytest.raises(CompactnnError, match=r"targets.names: 'stemm' matches no module.*stem"):
        compactnn.compress(m, str(path), progress=False)
    path.write_text("steps: [{method: rtn, targets: {names: ['stem.*']}}]\n")
    with pytest.warns(UserWarning, match="stay in float"):  # a matching pattern is fine
        q = compactnn.compress(m, str(path), progress=False)
    assert isinstance(q.stem[0], QuantConv2d) and type(q.head[1]) is nn.Linear


def test_compressing_a_quantized_model_again_says_its_layers_stay_as_they_are():
    """A second quantizing recipe skips layers an earlier compress quantized: say so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    q = compactnn.compress(model, "w8", progress=False)
    with pytest.warns(UserWarning, match=r"2 layers are already quantized \(by w8.*w4-g32 leaves"):
        again = compactnn.compress(q, "w4-g32", progress=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))  # indeed untouched


def test_probe_pruned_mlps_are_compressed_not_untargeted():
    """pp30 wraps each LLaMA MLP in a ProbeMLP that slices its projections per input: they
    are pruned by the recipe, so float_layers lists only the layers it left alone."""
    from compactnn.models.tiny_hf import tiny_model
    from compactnn.prune.probe import ProbeMLP

    torch.set_num_threads(1)
    model, calib = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "probe: only 16 calibration samples"
        q = compactnn.compress(model, "pp30", calib_data=calib, progress=False)
    probed = {
        f"{name}.{child}"
        for name, m in q.named_modules()
        if isinstance(m, ProbeMLP)
        for child in ("gate_proj", "up_proj", "down_proj")
    }
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert len(probed) == 6 and probed < linears
    float_layers = compactnn.info_of(q)["float_layers"]
    assert set(float_layers) == linears - probed
    assert set(float_layers.values()) == {"not targeted by the recipe"}


class Functional(nn.Module):
    """Weights used through F.conv2d / F.linear only: no layer module at all."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.fw = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.conv2d(x, self.w).mean((2, 3)), self.fw)


@pytest.mark.parametrize("recipe", ["w8a8", "w8", "nm2:4", "ch50"])
def test_a_model_of_functional_calls_is_refused_not_returned_unchanged(recipe):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(CompactnnError) as err:  # was a silent no-op (0 quantized layers)
        compactnn.compress(Functional().eval(), recipe, calib_data=x, progress=False)
    message = str(err.value)
    assert "\n" not in message and f"recipe {recipe!r}" in message
    assert "finds no layer of Functional" in message and "Linear/Conv1d/Conv2d" in message
    assert "F.linear" in message and "rewrite them as nn.Linear" in message


def test_a_recipe_whose_targets_exclude_every_layer_is_refused():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(CompactnnError, match=r"exclude every Linear/Conv1d/Conv2d module \(0, 2\)"):
        compactnn.compress(m, "w8", progress=False, ignore=["0", "2"])
    table = nn.Sequential(nn.Embedding(50, 8))  # weight-only: the table is the layer acted on
    q = compactnn.compress(table, "w8", progress=False)
    assert torch.equal(q[0].weight, rtn_int8(table[0].weight.detach()))


def test_channel_pruned_float_layers_say_how_many_channels_went(tmp_path):
    """A layer ch50 narrowed is compressed (by its shape), not "not targeted": its reason
    counts the output channels removed, as the shapes before and after do; the record
    survives save/load, and only a layer a step could not compress is warned about."""
    m, x = small_cnn(), torch.randn(8, 1, 8, 8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = compactnn.compress(m, "ch50", calib_data=x, progress=False)
    float_layers = compactnn.info_of(q)["float_layers"]
    for i in (0, 3):
        before, after = m[i].out_channels, q[i].out_channels
        assert after < before
        assert float_layers[str(i)] == (
            f"pruned ({before - after} of {before} output channels removed), weights in float"
        )
    assert float_layers["8"].startswith("channel pruning skipped it")  # the model's outputs
    assert not [w for w in rec if "kept in float" in str(w.message)]
    compactnn.save(q, tmp_path / "a")
    assert compactnn.info_of(compactnn.load(tmp_path / "a", model=m))["float_layers"] == (
        float_layers
    )


def test_the_entry_point_table_of_usage_md_lists_every_keyword():
    """docs/usage.md's table of calls names each keyword-only parameter (a tester found five
    calls whose newer options were missing)."""
    import inspect
    import re
    from pathlib import Path

    import compactnn.report

    doc = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    calls = {
        "compactnn.compress": compactnn.compress, "compactnn.save": compactnn.save,
        "compactnn.load": compactnn.load, "compactnn.evaluate": compactnn.evaluate,
        "compactnn.train": compactnn.train, "compactnn.deploy": compactnn.deploy,
        "compactnn.to_kernels": compactnn.to_kernels,
        "compactnn.report.build_report": compactnn.report.build_report,
    }  # fmt: skip
    for name, fn in calls.items():
        row = re.search(rf"^\| `{re.escape(name)}` \|(.*)$", doc, re.MULTILINE)
        assert row, name
        words = set(re.findall(r"\w+", row.group(1)))
        keywords = [
            p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY
        ]
        assert not [k for k in keywords if k not in words], (name, keywords)


def test_a_handler_that_forgets_return_model_is_named(monkeypatch):
    import dataclasses

    from compactnn import registry
    from compactnn.core.config import MethodConfig
    from compactnn.recipe import Recipe, Step

    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "METHODS_BY_CONFIG", dict(registry.METHODS_BY_CONFIG))

    @dataclasses.dataclass(frozen=True)
    class ForgetfulConfig(MethodConfig):
        pass

    @registry.register("forgetful", ForgetfulConfig)
    def forgetful(model, targets, config, ctx):
        """Changes the model but returns nothing."""

    @dataclasses.dataclass(frozen=True)
    class TupleConfig(MethodConfig):
        pass

    registry.register("tupled", TupleConfig)(lambda model, *rest: (model, 1))
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompactnnError, match="'forgetful': its handler returned None"):
        compactnn.compress(model, Recipe("f", [Step("forgetful", ForgetfulConfig())]))
    with pytest.raises(CompactnnError, match="'tupled': its handler returned a tuple"):
        compactnn.compress(model, Recipe("t", [Step("tupled", TupleConfig())]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input is untouched
