import pytest
import torch
from _ptq_models import images, output_mse, tiny_resnet

import compactnn
from compactnn.core.qlayers import ActQuantizer
from compactnn.core.spec import QuantSpec
from compactnn.engines.reconstruct import LSQActQuantizer
from compactnn.quant.qdrop import QDropConfig
from compactnn.recipe import Recipe, Step, parse_short_name

FAST = {"iters": 100, "num_samples": 128}


def recipe(name: str, **overrides) -> Recipe:
    step = parse_short_name(name).steps[0]
    cfg = type(step.config).from_dict({**step.config.to_dict(), **FAST, **overrides})
    return Recipe(name, (Step(step.method, cfg),))


def test_dropping_keeps_about_drop_prob_of_activations_float():
    base = ActQuantizer(QuantSpec(bits=2, symmetric=False, granularity="tensor"))
    base.set_qparams(torch.tensor(0.5), torch.tensor(0.0))
    q = LSQActQuantizer(base, drop_prob=0.5)
    x = torch.rand(10_000) * 1.7
    kept = (q(x) == x).float().mean()
    on_grid = ((x / 0.5).round() * 0.5).clamp(max=1.5) == x
    assert 0.45 < kept - on_grid.float().mean() * 0.5 < 0.55
    q.eval()  # no dropping outside training
    assert torch.equal(q(x), ((x / 0.5).round().clamp(0, 3)) * 0.5)


def test_qdrop_beats_round_to_nearest():
    m = tiny_resnet()
    x, held_out = images(128, seed=1), images(128, seed=2)
    rtn = compactnn.compress(m, "w3a4-mse", calib_data=x, progress=False)
    qd = compactnn.compress(m, recipe("w3a4-qdrop"), calib_data=x, progress=False)
    assert output_mse(qd, m, held_out) < 0.8 * output_mse(rtn, m, held_out)


def test_saved_artifact_gives_identical_outputs(tmp_path):
    m = tiny_resnet()
    x = images()
    q = compactnn.compress(m, recipe("w4a4-qdrop"), calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "a")
    q2 = compactnn.load(tmp_path / "a", model=tiny_resnet())
    assert torch.equal(q2(x), q(x))


def test_zero_drop_probability_is_refused():
    with pytest.raises(compactnn.CompactnnError, match="drop_prob"):
        QDropConfig(drop_prob=0.0)
