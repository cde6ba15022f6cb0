import copy

import pytest
import torch
from _ptq_models import images, output_mse, tiny_mlp, tiny_resnet

import compactnn
from compactnn.core.fold import fold_batchnorm
from compactnn.core.qlayers import is_quant_layer
from compactnn.core.quantize import grouped_view
from compactnn.quant.adaround import AdaRoundConfig
from compactnn.recipe import Recipe, Step, parse_short_name

FAST = {"iters": 100, "num_samples": 64}


def recipe(name: str, **overrides) -> Recipe:
    step = parse_short_name(name).steps[0]
    cfg = type(step.config).from_dict({**step.config.to_dict(), **FAST, **overrides})
    return Recipe(name, (Step(step.method, cfg),))


def test_short_name_builds_an_adaround_step_with_mse_ranges():
    step = parse_short_name("w4a4-adaround").steps[0]
    assert step.method == "adaround"
    assert isinstance(step.config, AdaRoundConfig)
    assert step.config.weight.range_method == "mse"
    assert step.config.act.bits == 4


def test_rounding_only_moves_to_floor_or_ceiling():
    m = tiny_resnet()
    float_ref = copy.deepcopy(m)
    fold_batchnorm(float_ref)
    q = compactnn.compress(m, recipe("w3a8-adaround"), calib_data=images(), progress=False)
    moved_up = 0
    for name, layer in q.named_modules():
        if not is_quant_layer(layer):
            continue
        spec = layer.weight_spec
        w = grouped_view(float_ref.get_submodule(name).weight.detach(), spec.granularity)
        ratio = w / layer.weight_scale.unsqueeze(-1)
        zero = layer.weight_zero.unsqueeze(-1)
        lo = torch.clamp(torch.floor(ratio) + zero, spec.qtype.qmin, spec.qtype.qmax)
        hi = torch.clamp(torch.floor(ratio) + 1 + zero, spec.qtype.qmin, spec.qtype.qmax)
        codes = grouped_view(layer.weight_codes.float(), spec.granularity)
        assert torch.all((codes == lo) | (codes == hi)), name
        nearest = torch.clamp(torch.round(ratio) + zero, spec.qtype.qmin, spec.qtype.qmax)
        moved_up += int((codes != nearest).sum())
    assert moved_up > 0  # the learned rounding differs from round-to-nearest somewhere


def test_beats_round_to_nearest_on_held_out_inputs():
    m = tiny_mlp()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    held_out = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    rtn = compactnn.compress(m, "w3a8-mse", calib_data=x, progress=False)
    ada = compactnn.compress(m, recipe("w3a8-adaround", iters=200), calib_data=x, progress=False)
    assert output_mse(ada, m, held_out) < 0.8 * output_mse(rtn, m, held_out)


def test_saved_artifact_gives_identical_outputs(tmp_path):
    m = tiny_resnet()
    x = images()
    q = compactnn.compress(m, recipe("w4a4-adaround"), calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "a")
    q2 = compactnn.load(tmp_path / "a", model=tiny_resnet())
    assert torch.equal(q2(x), q(x))


def test_too_few_samples_warns_with_the_number_needed():
    with pytest.warns(UserWarning, match="only 64 calibration samples.*1024"):
        few_iters = Recipe("a", (Step("adaround", AdaRoundConfig.from_short(4, 8, None, iters=5)),))
        compactnn.compress(tiny_mlp(), few_iters, calib_data=torch.randn(64, 16), progress=False)


def test_no_calibration_data_is_a_clear_error():
    with pytest.raises(compactnn.CompactnnError, match="needs calibration data"):
        compactnn.compress(tiny_mlp(), "w4a8-adaround", progress=False)


def test_bad_config_is_rejected():
    with pytest.raises(compactnn.CompactnnError, match="unit"):
        AdaRoundConfig(unit="row")
    # the field's name before version 2 still loads
    assert AdaRoundConfig.from_dict({"granularity": "block"}).unit == "block"
