"""The registry: one entry per config type and per name, valid default configs, and every
registered method end to end (compress, YAML round trip, save, load bit-exact)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import compactnn
from compactnn import registry
from compactnn.core.config import MethodConfig
from compactnn.core.qlayers import is_quant_layer
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import outputs, tiny_model
from compactnn.quant.rtn import RTNConfig
from compactnn.recipe import Recipe, Step, resolve_recipe

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*calibration samples", "ignore:kept in float", "ignore:channel pruning skipped"
)

ALL_METHODS = sorted(registry.METHODS)


class TinyCNN(nn.Module):
    """conv -> bn -> relu (x2), conv -> relu, mean pool, linear: inputs ``(N, 3, 8, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))  # (N, 4)


def tiny_cnn() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial batch-norm statistics, so folding matters
        for bn in (model.b1, model.b2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return model.eval(), [images[:8], images[8:]]


# Methods that need a transformer's repeated blocks (or whose N:M groups need widths the
# tiny CNN's first conv, 27 inputs, lacks) run on a 2-layer random Llama; the rest on the CNN.
TRANSFORMER_METHODS = {
    "awq", "gptq", "gptq_tune", "nm", "probe", "smoothquant", "sparsegpt", "ternarybert", "wanda"
}  # fmt: skip

# The default config of each method, with iteration counts cut where the default would
# take seconds (the default itself must still construct: test_default_configs_...).
SMALL = {
    "adaround": {"iters": 20},
    "brecq": {"iters": 20},
    "qdrop": {"iters": 20},
    "dns": {"surgery_steps": 10, "finetune_steps": 5, "frequency": 5},
    "gradual": {"end_step": 10, "frequency": 5, "finetune_steps": 5},
    "gptq_tune": {"tune_steps": 5, "e2e_steps": 5},
    "ternarybert": {"steps": 3},
}
# Float transforms: they change weights but neither quantize nor prune.
FLOAT_METHODS = {"cle"}
DYNAMIC_METHODS = {"probe"}  # weights kept; which channels run is chosen per batch
PRUNE_METHODS = {"channel", "dns", "gradual", "magnitude", "nm", "sparsegpt", "wanda"}
CASES = {name: SMALL.get(name, {}) for name in ALL_METHODS}


def small_config(name: str) -> MethodConfig:
    default = registry.METHODS[name].config_cls()
    return dataclasses.replace(default, **SMALL.get(name, {}))


def run(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return outputs(model, batch)
    with torch.no_grad():
        return model(batch)


def changed_weights(before: nn.Module, after: nn.Module) -> bool:
    old = before.state_dict()
    return any(k not in old or not torch.equal(v, old[k]) for k, v in after.state_dict().items())


def test_every_registered_method_has_a_case():
    # a new method must get a line here (a model kind and, if slow, smaller settings)
    assert set(CASES) == set(registry.METHODS)
    # (names of deleted methods may linger in the tables above: deleting a method's file,
    # test and registry line must leave this suite green, so they are not checked here)


def test_both_indexes_hold_the_same_entries():
    assert len(registry.METHODS_BY_CONFIG) == len(registry.METHODS) == len(ALL_METHODS)
    for name, entry in registry.METHODS.items():
        assert entry.name == name
        assert registry.METHODS_BY_CONFIG[entry.config_cls] is entry
        assert entry.config_cls.method_name == name


@pytest.mark.parametrize("name", ALL_METHODS)
def test_default_config_constructs_round_trips_and_names_its_method(name):
    entry = registry.METHODS[name]
    config = entry.config_cls()
    assert registry.method_for_config(config) is entry
    assert type(config).from_dict(config.to_dict()) == config
    assert isinstance(entry.version, int) and entry.version >= 1
    assert entry.version == getattr(entry.config_cls, "config_version", 1)


@pytest.mark.parametrize(
    "short",
    ["w1a1-xnor", "w1a1-bireal", "w1a1-reactnet", "w2a8-twn", "w2a8-ttq", "w8a8-smoothquant"],
)
def test_defaults_are_those_of_the_methods_short_name(short):
    (step,) = resolve_recipe(short).steps
    assert type(step.config)() == step.config


def test_a_config_runs_its_own_method_only():
    from compactnn.quant.gptq import GPTQConfig
    from compactnn.quant.gptq_tune import GPTQTuneConfig

    assert registry.method_for_config(GPTQConfig()).name == "gptq"
    assert registry.method_for_config(GPTQTuneConfig()).name == "gptq_tune"  # a subclass
    assert registry.method_for_config(RTNConfig()).name == "rtn"

    @dataclasses.dataclass(frozen=True)
    class UnregisteredConfig(RTNConfig):
        pass

    with pytest.raises(CompactnnError, match="UnregisteredConfig"):
        registry.method_for_config(UnregisteredConfig())
    with pytest.raises(CompactnnError, match="dict"):
        registry.method_for_config({"weight": {"bits": 4}})


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry's tables as copies, so a test may register methods of its own."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "METHODS_BY_CONFIG", dict(registry.METHODS_BY_CONFIG))


def _handler(model, targets, config, ctx):
    """A handler that does nothing."""
    return model


def test_register_refuses_a_second_name_or_config_type(scratch_registry):
    @dataclasses.dataclass(frozen=True)
    class FreshConfig(MethodConfig):
        config_version = 2

    before = (dict(registry.METHODS), dict(registry.METHODS_BY_CONFIG))
    with pytest.raises(CompactnnError, match="'rtn' is registered twice"):
        registry.register("rtn", FreshConfig)(_handler)
    with pytest.raises(CompactnnError, match="RTNConfig is already the config of method 'rtn'"):
        registry.register("fresh", RTNConfig)(_handler)
    with pytest.raises(CompactnnError, match="MethodConfig subclass"):
        registry.register("fresh", dict)(_handler)
    assert (registry.METHODS, registry.METHODS_BY_CONFIG) == before  # refusals change nothing
    registry.register("fresh", FreshConfig)(_handler)
    entry = registry.method_for_config(FreshConfig())
    assert entry is registry.get_method("fresh") and entry.summary == "A handler that does nothing."
    assert entry.version == 2


def test_config_versions_are_checked(scratch_registry):
    @dataclasses.dataclass(frozen=True)
    class BadVersionConfig(MethodConfig):
        config_version = 0

    with pytest.raises(CompactnnError, match="config_version=0 must be a positive integer"):
        registry.register("bad_version", BadVersionConfig)(_handler)
    entry = registry.get_method("rtn")
    registry.check_config_version(entry, 1)
    for bad in (0, entry.version + 1, "1", True, None):
        with pytest.raises(CompactnnError, match="'rtn'"):
            registry.check_config_version(entry, bad)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_method_end_to_end(name, tmp_path):
    arch = "bert" if name == "ternarybert" else "llama"  # an encoder method: decoders refused
    float_model, calib = tiny_model(arch) if name in TRANSFORMER_METHODS else tiny_cnn()
    reference = copy.deepcopy(float_model)
    recipe = Recipe(f"only-{name}", (Step(name, small_config(name)),))
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe

    compressed = compactnn.compress(float_model, recipe, calib_data=calib, progress=False)
    assert not changed_weights(reference, float_model)  # compress works on a copy
    assert changed_weights(float_model, compressed)
    quantized = [n for n, m in compressed.named_modules() if is_quant_layer(m)]
    zeros = sum(int((m.weight == 0).sum()) for m in compressed.modules() if hasattr(m, "weight"))
    if name in FLOAT_METHODS:
        assert not quantized
        torch.testing.assert_close(run(compressed, calib[0]), run(float_model, calib[0]))
    elif name in DYNAMIC_METHODS:
        assert not torch.allclose(run(compressed, calib[0]), run(float_model, calib[0]))
    elif name in PRUNE_METHODS:
        n_before = sum(p.numel() for p in float_model.parameters())
        n_after = sum(p.numel() for p in compressed.parameters())
        assert zeros > 0 or n_after < n_before
    else:
        assert quantized

    compactnn.save(compressed, tmp_path / name)
    loaded = compactnn.load(tmp_path / name, model=float_model)
    for batch in calib:
        assert torch.equal(run(loaded, batch), run(compressed, batch))
    assert Recipe.from_yaml(loaded._compactnn["recipe"].to_yaml()) == recipe


def test_register_refuses_a_config_that_needs_arguments(scratch_registry):
    @dataclasses.dataclass(frozen=True)
    class NeedsXConfig(MethodConfig):
        x: float
        y: float = 1.0

    with pytest.raises(CompactnnError, match=r"NeedsXConfig\(\) must work .* field\(s\) x have"):
        registry.register("needs_x", NeedsXConfig)(_handler)
    assert "needs_x" not in registry.METHODS and NeedsXConfig not in registry.METHODS_BY_CONFIG

    @dataclasses.dataclass(frozen=True)
    class BadDefaultConfig(MethodConfig):
        bits: int = 0

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.bits < 1:
                raise CompactnnError(f"BadDefaultConfig.bits={self.bits} must be >= 1.")

    with pytest.raises(CompactnnError, match=r"defaults are refused \(BadDefaultConfig.bits=0"):
        registry.register("bad_default", BadDefaultConfig)(_handler)


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("", "must be lowercase"),
        ("a b", "must be lowercase"),
        ("my-pow2", "'my_pow2'"),
        ("W4", "'w4'"),
        ("2bit", "starting with a letter"),
        ("mse", "short-name grammar"),
        ("percentile", "short-name grammar"),
        ("g32", "group size"),
        ("pe50", "PE-wise"),
    ],
)
def test_register_refuses_names_short_names_cannot_pick(scratch_registry, name, needle):
    @dataclasses.dataclass(frozen=True)
    class NameConfig(RTNConfig):
        pass

    with pytest.raises(CompactnnError, match=needle):
        registry.register(name, NameConfig)(_handler)
    assert name not in registry.METHODS and NameConfig not in registry.METHODS_BY_CONFIG


def test_a_registered_quant_method_is_picked_by_its_short_name(scratch_registry):
    @dataclasses.dataclass(frozen=True)
    class MseLikeConfig(RTNConfig):
        pass

    registry.register("mse_like", MseLikeConfig)(_handler)
    assert [s.method for s in resolve_recipe("w4-mse_like").steps] == ["mse_like"]
    assert [s.method for s in resolve_recipe("w4-mse").steps] == ["rtn"]  # the alias stays


def test_an_unknown_method_name_is_quoted_cut_short():
    """A recipe file's huge method name was printed whole in the one-line error."""
    from compactnn.registry import get_method

    with pytest.raises(CompactnnError, match="unknown method") as err:
        get_method("x" * 5000)
    assert len(str(err.value)) < 1000 and "..." in str(err.value)


def test_a_lookup_by_name_loads_the_built_in_catalog_after_a_plain_import():
    """``import compactnn`` imports its parts on first use: ``compactnn.recipe`` and the
    registry used straight after it must still see the built-in methods (the distributed
    training scripts said "unknown method 'lsq'; known methods: .")."""
    import subprocess
    import sys

    code = (
        "import compactnn, sys; from compactnn.recipe import resolve_recipe; "
        "from compactnn.registry import get_method; "
        "print(resolve_recipe('w4a4-lsq').steps[0].method, get_method('gptq').name)"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["lsq", "gptq"], out.stderr[-2000:]
