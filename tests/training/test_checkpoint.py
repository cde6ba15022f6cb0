"""A checkpoint is continued only by a run from the same float model and the same data."""

import copy
import os

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.training import loop
from compactnn.training.checkpoint import checkpoint_path, run_fingerprints, tensors_sha256
from compactnn.training.data import as_train_data

KW = dict(epochs=1, seed=0, progress=False)
WAY_OUT = r"Pass resume=False \(--no-resume\) to start over, or use a new checkpoint_dir"


def _count_steps(monkeypatch) -> list[int]:
    calls = []
    real = loop._train_epoch

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", counted)
    return calls


def test_tensors_sha256_sees_names_dtypes_shapes_and_every_byte():
    base = tensors_sha256([("w", torch.zeros(4)), ("n", 3)])
    assert base == tensors_sha256([("w", torch.zeros(4)), ("n", 3)])
    changed = torch.zeros(4)
    changed[3] = 1e-7
    others = [
        [("v", torch.zeros(4)), ("n", 3)],
        [("w", torch.zeros(2, 2)), ("n", 3)],
        [("w", torch.zeros(4, dtype=torch.float64)), ("n", 3)],
        [("w", changed), ("n", 3)],
        [("w", torch.zeros(4)), ("n", 4)],
    ]
    assert len({base, *(tensors_sha256(o) for o in others)}) == 6
    bf16 = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t()  # not contiguous
    assert tensors_sha256([("b", bf16)]) == tensors_sha256([("b", bf16.contiguous())])


def test_fingerprints_of_a_shuffling_loader_leave_the_rng_alone(tiny):
    model, (x, y), _ = tiny
    ds = torch.utils.data.TensorDataset(x, y)
    data = as_train_data(torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True))
    torch.manual_seed(5)
    a = run_fingerprints(model, data)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # no draw was consumed
    torch.manual_seed(5)
    assert run_fingerprints(model, data) == a  # same seed: same first batch
    other = as_train_data(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True))
    torch.manual_seed(5)
    assert run_fingerprints(model, other)["data_sha256"] != a["data_sha256"]
    tensors = run_fingerprints(model, as_train_data((x, y)))
    assert tensors["model_sha256"] == a["model_sha256"]


def test_a_checkpoint_of_another_starting_model_is_refused_before_any_step(
    tiny, tmp_path, monkeypatch
):
    model, data, _ = tiny
    compactnn.train(model, "w4a4-pact", data, checkpoint_dir=tmp_path, **KW)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.weight[0, 0] += 0.5
    steps = _count_steps(monkeypatch)
    match = r"its starting float model \(--weights\).*" + WAY_OUT
    with pytest.raises(CompactnnError, match=match):
        compactnn.train(other, "w4a4-pact", data, checkpoint_dir=tmp_path, **KW)
    assert steps == []
    # the same model and data still resume (the finished run: no epoch left to train)
    compactnn.train(model, "w4a4-pact", data, checkpoint_dir=tmp_path, **KW)
    assert steps == []
    fresh = compactnn.train(other, "w4a4-pact", data, checkpoint_dir=tmp_path, resume=False, **KW)
    assert steps == [1]
    q_other = compactnn.train(other, "w4a4-pact", data, **KW)
    for k, v in q_other.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_a_checkpoint_of_other_data_is_refused(tiny, tmp_path, monkeypatch):
    model, (x, y), _ = tiny
    compactnn.train(model, "w4a4-pact", (x, y), checkpoint_dir=tmp_path, **KW)
    steps = _count_steps(monkeypatch)
    match = r"its training data \(--data\).*" + WAY_OUT
    flipped = y.clone()
    flipped[0] = (flipped[0] + 1) % 4  # one label differs
    for other in [(x, flipped), (x.flip(0), y.flip(0)), (x[:-1], y[:-1])]:
        with pytest.raises(CompactnnError, match=match):
            compactnn.train(model, "w4a4-pact", other, checkpoint_dir=tmp_path, **KW)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    with pytest.raises(CompactnnError, match=match):  # the same samples as batches
        compactnn.train(model, "w4a4-pact", batches, checkpoint_dir=tmp_path, **KW)
    assert steps == []


def test_a_checkpoint_without_fingerprints_is_refused(tiny, tmp_path):
    model, data, _ = tiny
    compactnn.train(model, "w4a4-pact", data, checkpoint_dir=tmp_path, max_steps=2, **KW)
    path = checkpoint_path(tmp_path)
    state = torch.load(path, weights_only=True)
    assert set(state["run"]) >= {"model_sha256", "data_sha256"}
    del state["run"]["model_sha256"], state["run"]["data_sha256"]
    torch.save(state, path)  # as an older compactnn wrote it
    with pytest.raises(CompactnnError, match="older compactnn.*" + WAY_OUT):
        compactnn.train(model, "w4a4-pact", data, checkpoint_dir=tmp_path, **KW)


def test_checkpoint_position_says_where_a_run_stands(tiny, tmp_path):
    """epochs done, batches done of the next, the run's total: read from the checkpoint
    itself (the same numbers torch.load gives), None without a readable one."""
    from compactnn.training.checkpoint import checkpoint_position, resume_line

    model, data, _ = tiny
    assert checkpoint_position(tmp_path) is None
    kw = {**KW, "epochs": 2}
    compactnn.train(model, "w4a4-pact", data, checkpoint_dir=tmp_path, max_steps=3, **kw)
    state = torch.load(checkpoint_path(tmp_path), weights_only=True)
    position = checkpoint_position(tmp_path)
    assert position == {"epoch": state["epoch"], "batch": state["batch"], "epochs": 2}
    assert position["epoch"] == 0 and position["batch"] == 3 == state["step"]
    assert resume_line("ck", position) == "resumed from ck at epoch 1 of 2, after its batch 3"
    compactnn.train(model, "w4a4-pact", data, checkpoint_dir=tmp_path, **kw)
    position = checkpoint_position(tmp_path)
    assert position == {"epoch": 2, "batch": 0, "epochs": 2}
    said = "resumed from ck: all 2 epochs were already done (nothing trained)"
    assert resume_line("ck", position) == said
    assert resume_line("ck", {"epoch": 1, "batch": 0, "epochs": 3}) == (
        "resumed from ck at epoch 2 of 3"
    )
    assert resume_line("ck", {"epoch": 1, "batch": 0, "epochs": 1}) == (
        "resumed from ck: its 1 epoch was already done (nothing trained)"
    )
    checkpoint_path(tmp_path).write_bytes(b"not a checkpoint")
    assert checkpoint_position(tmp_path) is None  # load_checkpoint says why, at train


def test_a_checkpoint_dir_that_cannot_hold_one_is_refused_before_training(
    tiny, tmp_path, monkeypatch
):
    """A file, a path under a file, a system folder, a qat-checkpoint.pt that is a folder,
    an unwritable folder: one CompactnnError naming checkpoint_dir, before any step (it
    used to train a whole epoch, then fail in mkdir with FileExistsError)."""
    from compactnn.training import checkpoint

    model, data, _ = tiny
    calls = _count_steps(monkeypatch)
    weights = tmp_path / "net.safetensors"
    weights.write_bytes(b"weights")
    (tmp_path / "odd" / checkpoint.CHECKPOINT).mkdir(parents=True)
    cases = {
        weights: "is a file, not a folder: pass checkpoint_dir='DIR' naming a folder",
        weights / "ck": f"lies under the file {str(weights)!r}, not a folder",
        "/proc/ck": "lies under /proc, a system folder",
        tmp_path / "odd": "holds qat-checkpoint.pt that is not a file",
    }
    for directory, words in cases.items():
        with pytest.raises(CompactnnError) as err:
            compactnn.train(model, "w4a4-pact", data, checkpoint_dir=directory, **KW)
        assert str(err.value).startswith(f"checkpoint_dir {str(directory)!r} {words}")
        assert "\n" not in str(err.value)

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(checkpoint.tempfile, "TemporaryFile", unwritable)
        for directory, which in ((tmp_path, ""), (tmp_path / "a" / "b", " (its nearest")):
            with pytest.raises(CompactnnError) as err:
                compactnn.train(model, "w4a4-pact", data, checkpoint_dir=directory, **KW)
            assert str(err.value).startswith(f"checkpoint_dir {str(directory)!r} is not writable")
            assert f"{which}" in str(err.value) and "Permission denied" in str(err.value)
    assert calls == [] and weights.read_bytes() == b"weights"
    assert not (tmp_path / "a").exists()  # nothing created
    checkpoint.check_checkpoint_dir(tmp_path / "new" / "ck")  # a new folder is fine
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_dir_is_refused(tmp_path):
    from compactnn.training.checkpoint import check_checkpoint_dir

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    for directory in (locked, locked / "ck"):
        with pytest.raises(CompactnnError, match="is not writable"):
            check_checkpoint_dir(directory)


class _NotTensors:
    """An object a weights-only load refuses (its unpickling would import this module)."""


@pytest.mark.parametrize("payload", ["object", "bytes", "list"])
def test_a_foreign_or_corrupt_checkpoint_is_refused_in_one_line(tiny, tmp_path, payload):
    model, data, _ = tiny
    path = checkpoint_path(tmp_path)
    if payload == "object":  # a pickle payload: torch's text would advise weights_only=False
        torch.save({"run": _NotTensors()}, path)
    elif payload == "bytes":
        path.write_bytes(b"PK\x03\x04 not a zip")
    else:
        torch.save([1, 2], path)  # readable, but not a checkpoint
    with pytest.raises(CompactnnError) as err:
        compactnn.train(model, "w4a4-pact", data, checkpoint_dir=tmp_path, **KW)
    message = str(err.value)
    assert "\n" not in message and "weights_only" not in message
    assert "is not a compactnn checkpoint or is corrupt" in message
    assert message.endswith("delete it, or pass resume=False (--no-resume) to start over.")
