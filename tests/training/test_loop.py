import copy
import dataclasses
import json
import math

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.training.checkpoint import checkpoint_path


def _state(q):
    return {k: v for k, v in q.state_dict().items()}


def test_training_beats_post_training_and_records_history(tiny):
    model, data, (xt, yt) = tiny
    ptq = compactnn.compress(model, "w2a2-lsq", calib_data=data[0][:64], progress=False)
    q = compactnn.train(model, "w2a2-lsq", data, epochs=3, eval_data=(xt, yt), progress=False)
    acc = lambda m: float((m(xt).argmax(1) == yt).float().mean())  # noqa: E731
    hist = compactnn.info_of(q)["extra"]["training"]
    assert len(hist["eval_top1"]) == 3 and hist["complete"]
    assert acc(q) >= max(acc(ptq), 0.9)


def test_same_seed_same_run_and_resume_is_exact(tiny, tmp_path):
    model, data, _ = tiny
    kw = dict(epochs=2, seed=3, progress=False)
    full = compactnn.train(model, "w4a4-pact", data, **kw)
    again = compactnn.train(model, "w4a4-pact", data, **kw)
    assert all(
        torch.equal(a, b)
        for a, b in zip(_state(full).values(), _state(again).values(), strict=True)
    )
    ckpt = tmp_path / "ck"
    part = compactnn.train(model, "w4a4-pact", data, checkpoint_dir=ckpt, max_steps=5, **kw)
    assert not compactnn.info_of(part)["extra"]["training"]["complete"]
    assert checkpoint_path(ckpt).is_file()
    resumed = compactnn.train(model, "w4a4-pact", data, checkpoint_dir=ckpt, **kw)
    for k, v in _state(full).items():
        assert torch.equal(v, _state(resumed)[k]), k


def test_inq_every_weight_is_zero_or_power_of_two(tiny):
    model, data, _ = tiny
    q = compactnn.train(model, "w5-inq", data, epochs=2, progress=False)
    for m in q.modules():
        if hasattr(m, "weight_codes"):
            nz = m.weight[m.weight != 0].abs()
            assert torch.equal(torch.log2(nz), torch.log2(nz).round())


def test_checkpoint_from_another_recipe_is_refused(tiny, tmp_path):
    model, data, _ = tiny
    compactnn.train(model, "w4a4-pact", data, epochs=1, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CompactnnError, match="written by recipe 'w4a4-pact', not 'w2a2-lsq'"):
        compactnn.train(model, "w2a2-lsq", data, epochs=1, checkpoint_dir=tmp_path, progress=False)
    mismatch = r"epochs=1, this run has epochs=2.*resume=False \(--no-resume\)"
    with pytest.raises(CompactnnError, match=mismatch):
        compactnn.train(model, "w4a4-pact", data, epochs=2, checkpoint_dir=tmp_path, progress=False)


def test_bad_labels_and_teacher_are_refused(tiny):
    model, (x, y), _ = tiny
    with pytest.raises(CompactnnError, match="no labels"):
        compactnn.train(model, "w4a4-lsq", x, epochs=1, progress=False)
    y_bad = y.clone()
    y_bad[0] = 4
    with pytest.raises(CompactnnError, match=r"labels range over \[0, 4\].*4 outputs"):
        compactnn.train(model, "w4a4-lsq", (x, y_bad), epochs=1, progress=False)
    with pytest.raises(CompactnnError, match="integer tensor"):
        compactnn.train(model, "w4a4-lsq", (x, y.float()), epochs=1, progress=False)
    with pytest.raises(CompactnnError, match="no labels"):
        compactnn.train(model, "w4a4-lsq", [x[:8], x[8:16], x[16:]], epochs=1, progress=False)
    bad_teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))
    with pytest.raises(CompactnnError, match=r"teacher's output \(2, 7\).*\(2, 4\)"):
        compactnn.train(model, "w2a2-lsq", (x, y), teacher=bad_teacher, progress=False)


def _top1(model, x, y):
    """Top-1 in percent, computed here independently of compactnn.training.evaluate_top1."""
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).sum()) / y.numel()


def _hot_lsq(lr):
    """w2a2-lsq with the weights' learning rate raised to ``lr``."""
    step = compactnn.resolve_recipe("w2a2-lsq").steps[0]
    config = dataclasses.replace(step.config, lr=lr)
    return compactnn.Recipe("w2a2-lsq-hot", [compactnn.Step(step.method, config, step.targets)])


def test_epoch_lines_are_printed_with_progress_and_silent_without(tiny, capsys):
    model, data, (xt, yt) = tiny
    compactnn.train(model, "w4a4-pact", data, epochs=2, eval_data=(xt, yt), progress=True)
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("train loss" in ln and "eval top-1" in ln and "lr " in ln for ln in lines)
    compactnn.train(model, "w4a4-pact", data, epochs=2, eval_data=(xt, yt), progress=False)
    assert capsys.readouterr().out == ""


def test_jsonl_log_has_one_record_per_epoch_with_the_frozen_models_top1(tiny, tmp_path):
    model, data, (xt, yt) = tiny
    log = tmp_path / "logs" / "train.jsonl"
    kw = dict(epochs=3, eval_data=(xt, yt), progress=False)
    q = compactnn.train(model, "w4a4-pact", data, log_path=log, **kw)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    hist = compactnn.info_of(q)["extra"]["training"]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["eval_top1"] for r in records] == hist["eval_top1"]
    assert [round(r["train_loss"], 4) for r in records] == hist["loss"]
    assert records[0]["lr"] == compactnn.resolve_recipe("w4a4-pact").steps[0].config.lr
    assert records[0]["lr"] > records[1]["lr"] > records[2]["lr"]  # cosine schedule
    assert all(r["seconds"] > 0 for r in records)
    steps_per_epoch = records[0]["step"]
    for r in records:  # stopping after epoch k's last step leaves epoch k's model
        part = compactnn.train(model, "w4a4-pact", data, max_steps=r["step"], **kw)
        assert r["step"] == r["epoch"] * steps_per_epoch
        assert r["eval_top1"] == round(_top1(part, xt, yt), 4)


def test_keep_best_returns_the_best_epochs_model_not_the_last(tiny):
    model, data, (xt, yt) = tiny
    hot = _hot_lsq(0.2)  # a learning rate this high makes later epochs worse
    kw = dict(epochs=4, eval_data=(xt, yt), progress=False)
    last = compactnn.train(model, hot, data, **kw)
    best = compactnn.train(model, hot, data, keep_best=True, **kw)
    hist = compactnn.info_of(best)["extra"]["training"]
    scores = hist["eval_top1"]
    assert scores == compactnn.info_of(last)["extra"]["training"]["eval_top1"]
    want = max(i for i, s in enumerate(scores) if s == max(scores)) + 1  # ties: the later
    assert hist["kept_epoch"] == want and want < 4, scores
    assert hist["kept_eval_top1"] == max(scores)
    assert round(_top1(best, xt, yt), 4) == max(scores) > round(_top1(last, xt, yt), 4)
    assert round(_top1(last, xt, yt), 4) == scores[-1]
    assert "kept_epoch" not in compactnn.info_of(last)["extra"]["training"]


def test_keep_best_survives_a_resume(tiny, tmp_path):
    model, data, (xt, yt) = tiny
    kw = dict(epochs=4, eval_data=(xt, yt), keep_best=True, progress=False)
    full = compactnn.train(model, _hot_lsq(0.2), data, **kw)
    ckpt = tmp_path / "ck"
    compactnn.train(model, _hot_lsq(0.2), data, checkpoint_dir=ckpt, max_steps=9, **kw)
    resumed = compactnn.train(model, _hot_lsq(0.2), data, checkpoint_dir=ckpt, **kw)
    h_full, h_resumed = (compactnn.info_of(q)["extra"]["training"] for q in (full, resumed))
    for key in ("eval_top1", "kept_epoch", "kept_eval_top1"):
        assert h_resumed[key] == h_full[key], key
    for k, v in _state(full).items():
        assert torch.equal(v, _state(resumed)[k]), k


def test_keep_best_and_eval_data_mistakes_are_refused_before_training(tiny, tmp_path):
    model, data, (xt, yt) = tiny
    with pytest.raises(CompactnnError, match=r"keep_best=True .* needs eval_data"):
        compactnn.train(model, "w4a4-pact", data, keep_best=True, progress=False)
    with pytest.raises(CompactnnError, match=r"eval_data inputs have per-sample shape \(1, 4, 4\)"):
        compactnn.train(model, "w4a4-pact", data, eval_data=(xt[:, :, :4, :4], yt))
    with pytest.raises(CompactnnError, match=r"eval_data: labels range over \[0, 9\]"):
        compactnn.train(model, "w4a4-pact", data, eval_data=(xt, yt * 3), progress=False)
    with pytest.raises(CompactnnError, match="eval_data: 128 inputs but 5 labels"):
        compactnn.train(model, "w4a4-pact", data, eval_data=(xt, yt[:5]), progress=False)
    with pytest.raises(CompactnnError, match=r"log_path .* cannot be written"):
        blocker = tmp_path / "file"
        blocker.write_text("")
        compactnn.train(model, "w4a4-pact", data, log_path=blocker / "log.jsonl")


def test_min_steps_raises_default_epochs_and_warmup_ramps_the_learning_rate():
    from compactnn.training.loop import epochs_for_min_steps, lr_schedule

    assert epochs_for_min_steps(10, 23, 600) == 27  # ceil(600 / 23)
    assert epochs_for_min_steps(10, 63, 600) == 10  # already 630 steps
    assert epochs_for_min_steps(0, 23, 600) == 0 and epochs_for_min_steps(4, 23, 0) == 4
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=0.1)
    sched = lr_schedule(opt, total=10, warmup=4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    by_hand = [0.1 * (s + 1) / 4 for s in range(4)]
    by_hand += [0.05 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(4, 10)]
    assert lrs == pytest.approx(by_hand, abs=1e-12)
    plain = lr_schedule(torch.optim.Adam([p], lr=0.1), total=10)
    assert isinstance(plain, torch.optim.lr_scheduler.CosineAnnealingLR)  # warmup 0: as before


def test_binary_recipe_min_steps_trains_more_epochs_unless_epochs_are_given(tiny):
    model, data, (xt, yt) = tiny  # 256 examples: 4 steps per epoch
    recipe = compactnn.resolve_recipe("w1a1-xnor")
    step = recipe.steps[0]
    cfg = dataclasses.replace(step.config, min_steps=40, recalibrate_batches=2, warmup_steps=3)
    hot = compactnn.Recipe("xnor-min40", (dataclasses.replace(step, config=cfg),))
    q = compactnn.train(model, hot, data, progress=False, eval_data=(xt, yt))
    hist = compactnn.info_of(q)["extra"]["training"]
    assert hist["epochs"] == 10 and hist["steps"] == 40 and len(hist["eval_top1"]) == 10
    acc = 100.0 * float((q(xt).argmax(1) == yt).float().mean())
    assert acc == pytest.approx(hist["eval_top1"][-1], abs=1e-3)  # recalibrated, then scored
    q2 = compactnn.train(model, hot, data, epochs=2, progress=False)
    assert compactnn.info_of(q2)["extra"]["training"]["steps"] == 8  # explicit epochs win


def test_a_non_finite_training_loss_stops_with_the_batch_and_a_hint(tiny):
    model, (x, y), _ = tiny
    x, y = torch.cat([x, x]), torch.cat([y, y])
    x[-1, 0, 0, 0] = float("nan")  # past the 256 samples that calibrate
    batches = list(zip(x.split(64), y.split(64), strict=True))  # a loader: checked as it runs
    with pytest.raises(CompactnnError, match=r"training loss is nan at epoch 1, batch 7 .*NaN"):
        compactnn.train(model, "w4a4-lsq", batches, epochs=1, progress=False, seed=0)


def test_non_finite_training_tensors_are_refused_as_training_data_before_training(tiny):
    model, (x, y), _ = tiny
    x, y = torch.cat([x, x]), torch.cat([y, y])
    for where in (3, 511):  # in the calibration samples, and past them
        bad = x.clone()
        bad[where, 0, 1, 2] = float("nan")
        with pytest.raises(
            CompactnnError,
            match=rf"^training data holds 1 NaN and 0 Inf value\(s\) \(first at index "
            rf"\({where}, 0, 1, 2\) of shape \(512, 1, 8, 8\)\)",
        ):
            compactnn.train(model, "w4a4-lsq", (bad, y), epochs=1, progress=False, seed=0)
    batches = [(x[:64].clone(), y[:64])]
    batches[0][0][5, 0, 0, 0] = float("inf")
    with pytest.raises(CompactnnError, match=r"^training batch 0 holds 0 NaN and 1 Inf"):
        compactnn.train(model, "w4a4-lsq", batches, epochs=1, progress=False, seed=0)


def test_a_recipe_whose_target_names_match_nothing_is_refused(tiny, tmp_path):
    model, data, _ = tiny
    path = tmp_path / "r.yaml"
    path.write_text("steps: [{method: lsq, targets: {names: [nothere]}}]\n")
    with pytest.raises(CompactnnError, match=r"targets.names: 'nothere' matches no module"):
        compactnn.train(model, str(path), data, epochs=1, progress=False)


def test_training_data_of_the_wrong_shape_names_it_and_the_expected_input():
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    wrong = torch.randn(8, 1, 28, 28)
    with pytest.raises(CompactnnError, match=r"training data does not fit.*\(8, 1, 28, 28\).*64"):
        compactnn.train(mlp, "w4a4-lsq", (wrong, torch.arange(8) % 4), epochs=1, progress=False)


def test_float16_and_float64_inputs_train_as_their_float32_values(tiny):
    model, (x, y), (xt, yt) = tiny
    x16, xt16 = x.half(), xt.half()  # the float32 run gets exactly these values
    kw = dict(epochs=1, seed=1, progress=False)
    ref = compactnn.train(model, "w4a4-lsq", (x16.float(), y), eval_data=(xt16.float(), yt), **kw)
    half = compactnn.train(model, "w4a4-lsq", (x16, y), eval_data=(xt16, yt), **kw)
    batches = [(a.double(), b) for a, b in zip(x16.float().split(64), y.split(64), strict=True)]
    ref_batches = [(a.float(), b) for a, b in batches]
    loader = compactnn.train(model, "w4a4-lsq", batches, **kw)  # float64 batches, as given
    ref_loader = compactnn.train(model, "w4a4-lsq", ref_batches, **kw)
    hist = lambda q: compactnn.info_of(q)["extra"]["training"]  # noqa: E731
    assert hist(half)["eval_top1"] == hist(ref)["eval_top1"] and hist(ref)["eval_top1"]
    for k, v in _state(ref).items():
        assert torch.equal(v, _state(half)[k]), k
    for k, v in _state(ref_loader).items():
        assert torch.equal(v, _state(loader)[k]), k


def test_integer_training_inputs_are_named_by_dtype_not_shape(tiny):
    model, (x, y), _ = tiny
    with pytest.raises(CompactnnError) as info:
        compactnn.train(model, "w4a4-lsq", (x.long(), y), epochs=1, progress=False)
    text = str(info.value)
    assert "integer (not cast) inputs of dtype torch.int64" in text and "(64, 1, 8, 8)" in text
    assert "parameters are torch.float32" in text and "of that shape" not in text


def test_a_model_left_in_train_mode_is_never_changed_and_its_statistics_are_kept(tiny):
    model, data, _ = tiny
    left_training = copy.deepcopy(model).train()  # as after the user's own training loop
    before = {k: v.clone() for k, v in left_training.state_dict().items()}
    kw = dict(epochs=1, max_steps=2, progress=False)  # w2a2-lsq distills from the input model
    q = compactnn.train(left_training, "w2a2-lsq", data, **kw)
    after = left_training.state_dict()
    for k, v in before.items():  # batch norms' running statistics and counters included
        assert torch.equal(v, after[k]), k
    assert all(m.training for m in left_training.modules())
    # the trained copy and the teacher start from the input's statistics (not from those of
    # a probing batch): the same run as from the model in eval mode
    ref = compactnn.train(model, "w2a2-lsq", data, **kw)
    for k, v in _state(ref).items():
        assert torch.equal(v, _state(q)[k]), k


def test_epochs_below_one_are_refused(tiny):
    model, data, (xt, yt) = tiny
    for kw in ({}, {"eval_data": (xt, yt), "keep_best": True}):
        with pytest.raises(CompactnnError) as info:
            compactnn.train(model, "w4a4-pact", data, epochs=0, progress=False, **kw)
        assert str(info.value) == (
            "epochs=0 must be a whole number of 1 or more (0 trains nothing): pass epochs=1 "
            "or more, or use compactnn.compress for a model calibrated without training."
        )
    with pytest.raises(CompactnnError, match=r"^epochs=-2 must be a whole number"):
        compactnn.train(model, "w4a4-pact", data, epochs=-2, progress=False)


def test_an_existing_log_path_is_refused_unless_force_or_a_resume_appends(
    tiny, tmp_path, monkeypatch
):
    from compactnn.training import loop

    model, data, _ = tiny
    log, ckpt = tmp_path / "train.jsonl", tmp_path / "ck"
    log.write_text("my notes\n")
    kw = dict(epochs=2, progress=False, log_path=log)
    with monkeypatch.context() as m:
        m.setattr(loop, "prepare_qat", lambda *a, **k: pytest.fail("training began"))
        with pytest.raises(CompactnnError, match=r"log_path '.*train.jsonl' exists; pass force="):
            compactnn.train(model, "w4a4-pact", data, **kw)
        with pytest.raises(CompactnnError, match="exists; pass force=True"):  # no checkpoint
            compactnn.train(model, "w4a4-pact", data, checkpoint_dir=ckpt, **kw)
    assert log.read_text() == "my notes\n"
    bs = compactnn.resolve_recipe("w4a4-pact").steps[0].config.batch_size
    steps = -(-len(data[0]) // bs) + 1  # stops in epoch 2, after epoch 1's record
    compactnn.train(
        model, "w4a4-pact", data, checkpoint_dir=ckpt, max_steps=steps, force=True, **kw
    )
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1]
    compactnn.train(model, "w4a4-pact", data, checkpoint_dir=ckpt, **kw)  # resumes: appends
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    with pytest.raises(CompactnnError, match="exists; pass force=True"):  # a fresh run
        compactnn.train(model, "w4a4-pact", data, checkpoint_dir=ckpt, resume=False, **kw)
