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
    with pytest.raises(CompactnnError, match="epochs=1, this run has epochs=2"):
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
