import torch
from _ptq_models import images, output_mse, tiny_resnet

import compactnn
from compactnn.core.quantize import round_scale
from compactnn.recipe import Recipe, Step, parse_short_name

FAST = {"iters": 100, "num_samples": 128}


def recipe(name: str, **overrides) -> Recipe:
    step = parse_short_name(name).steps[0]
    cfg = type(step.config).from_dict({**step.config.to_dict(), **FAST, **overrides})
    return Recipe(name, (Step(step.method, cfg),))


def test_block_reconstruction_beats_round_to_nearest():
    m = tiny_resnet()
    x, held_out = images(128, seed=1), images(128, seed=2)
    rtn = compactnn.compress(m, "w3a4-mse", calib_data=x, progress=False)
    brecq = compactnn.compress(m, recipe("w3a4-brecq"), calib_data=x, progress=False)
    assert output_mse(brecq, m, held_out) < 0.8 * output_mse(rtn, m, held_out)


def test_learned_activation_steps_are_written_back_fp16_exact():
    m = tiny_resnet()
    x = images()
    rtn = compactnn.compress(m, "w3a4-mse", calib_data=x, progress=False)
    q = compactnn.compress(m, recipe("w3a4-brecq"), calib_data=x, progress=False)
    learned = q.block.conv2.input_quantizer.scale
    assert torch.equal(learned, round_scale(learned))
    assert not torch.equal(learned, rtn.block.conv2.input_quantizer.scale)
    assert q.block.conv2.input_quantizer.calibrated


def test_saved_artifact_gives_identical_outputs(tmp_path):
    m = tiny_resnet()
    x = images()
    q = compactnn.compress(m, recipe("w4a4-brecq"), calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "a")
    q2 = compactnn.load(tmp_path / "a", model=tiny_resnet())
    assert torch.equal(q2(x), q(x))
