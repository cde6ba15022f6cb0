"""A resumed run gives what the uninterrupted run gives: weights, history, log and the
artifact, for shuffling loaders too; a checkpoint scored otherwise is refused; the caller's
global RNG is left alone."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import compactnn
from compactnn.errors import CompactnnError
from compactnn.training import loop, resume

KW = dict(epochs=2, seed=0, progress=False)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("stop", [4, 6])  # 4 steps per epoch: at its end, and in the middle
def test_a_shuffling_dataloader_resumes_as_the_uninterrupted_run(tiny, tmp_path, stop):
    model, (x, y), _ = tiny

    def loader():
        return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    torch.manual_seed(123)  # the caller's state: the run must not depend on it
    whole = compactnn.train(model, "w4a4-lsq", loader(), **KW)
    ck = tmp_path / "ck"
    torch.manual_seed(7)
    compactnn.train(model, "w4a4-lsq", loader(), checkpoint_dir=ck, max_steps=stop, **KW)
    torch.manual_seed(99)
    resumed = compactnn.train(model, "w4a4-lsq", loader(), checkpoint_dir=ck, **KW)
    assert _same_weights(whole, resumed)
    history = compactnn.info_of(resumed)["extra"]["training"]
    assert history == compactnn.info_of(whole)["extra"]["training"]


def _own_generator(x, y, where):
    """A shuffling loader with its own generator, on the loader or on its sampler."""
    ds, gen = TensorDataset(x, y), torch.Generator().manual_seed(5)
    if where == "loader":
        return DataLoader(ds, batch_size=64, shuffle=True, generator=gen)
    return DataLoader(ds, batch_size=64, sampler=RandomSampler(ds, generator=gen))


@pytest.mark.parametrize("where", ["loader", "sampler"])
def test_a_loader_with_its_own_generator_trains_alike_with_a_checkpoint_and_resumes(
    tiny, tmp_path, where
):
    """The data fingerprint must not advance the loader's generator, and a resume restores
    it as at the epoch's start (4 steps per epoch: stopped at an epoch's end and inside)."""
    model, (x, y), _ = tiny
    whole = compactnn.train(model, "w4a4-lsq", _own_generator(x, y, where), **KW)
    ck = tmp_path / "ck"
    kept = compactnn.train(model, "w4a4-lsq", _own_generator(x, y, where), checkpoint_dir=ck,
                           **KW)  # fmt: skip
    assert _same_weights(whole, kept)
    for stop in (4, 6):
        ck = tmp_path / f"ck{stop}"
        compactnn.train(model, "w4a4-lsq", _own_generator(x, y, where), checkpoint_dir=ck,
                        max_steps=stop, **KW)  # fmt: skip
        resumed = compactnn.train(model, "w4a4-lsq", _own_generator(x, y, where),
                                  checkpoint_dir=ck, **KW)  # fmt: skip
        assert _same_weights(whole, resumed), stop
        history = compactnn.info_of(resumed)["extra"]["training"]
        assert history == compactnn.info_of(whole)["extra"]["training"]


def test_generator_states_of_another_loader_are_refused(tiny):
    """(The data fingerprint refuses most such checkpoints first: this is the last check.)"""
    _, (x, y), _ = tiny
    gens = resume.loader_generators(_own_generator(x, y, "loader"))
    assert len(gens) == 1  # the loader's and its sampler's are one generator
    saved = resume.rng_state(gens)
    with pytest.raises(CompactnnError, match=r"with 1 torch.Generator\(s\), this run's with 0"):
        resume.set_rng_state(saved, [])
    gens[0].manual_seed(9)
    resume.set_rng_state(saved, gens)
    assert torch.equal(gens[0].get_state(), saved["loader_rng"][0])


def test_a_mid_epoch_resume_gives_the_same_record_log_and_artifact(tiny, tmp_path):
    model, data, _ = tiny
    whole = compactnn.train(model, "w4a4-lsq", data, log_path=tmp_path / "a.jsonl", **KW)
    ck, log = tmp_path / "ck", tmp_path / "b.jsonl"
    compactnn.train(model, "w4a4-lsq", data, checkpoint_dir=ck, max_steps=6, log_path=log, **KW)
    resumed = compactnn.train(model, "w4a4-lsq", data, checkpoint_dir=ck, log_path=log, **KW)
    compactnn.save(whole, tmp_path / "A")
    compactnn.save(resumed, tmp_path / "B")
    assert compactnn.artifact_digest(tmp_path / "A") == compactnn.artifact_digest(tmp_path / "B")

    def records(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert records(log) == records(tmp_path / "a.jsonl")  # loss, top-1, the first step's lr
    assert [r["lr"] for r in records(log)] == pytest.approx([0.001, 0.0005])


def test_an_epoch_logged_but_not_checkpointed_is_logged_once(tiny, tmp_path, monkeypatch):
    """Stopped between writing epoch 2's log line and its checkpoint: the resumed run
    rewrites the log from the checkpoint, so epoch 2 appears once."""
    model, data, _ = tiny
    ck, log = tmp_path / "ck", tmp_path / "run.jsonl"
    real, calls = loop._checkpoint, []

    def stop_at_second_epoch(env, directory, r):
        calls.append(r.epoch)
        if r.epoch == 2:
            raise KeyboardInterrupt
        real(env, directory, r)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_checkpoint", stop_at_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            compactnn.train(model, "w4a4-lsq", data, epochs=3, seed=0, progress=False,
                            checkpoint_dir=ck, log_path=log)  # fmt: skip
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    compactnn.train(model, "w4a4-lsq", data, epochs=3, seed=0, progress=False,
                    checkpoint_dir=ck, log_path=log)  # fmt: skip
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_a_finished_checkpoint_resumed_logs_its_epochs(tiny, tmp_path):
    model, data, _ = tiny
    ck = tmp_path / "ck"
    compactnn.train(model, "w4a4-lsq", data, checkpoint_dir=ck, log_path=tmp_path / "a", **KW)
    again = tmp_path / "b.jsonl"  # nothing left to train: the log is the checkpoint's epochs
    compactnn.train(model, "w4a4-lsq", data, checkpoint_dir=ck, log_path=again, **KW)
    assert again.read_text() == (tmp_path / "a").read_text()


@pytest.mark.parametrize(
    ("first", "then", "words"),
    [
        ({}, {"keep_best": True}, r"keep_best=True: it kept no state of its epochs, so those"),
        ({}, {}, r"without eval_data \(--eval-data\) and this run has some"),
        ({"keep_best": True}, {"keep_best": False}, r"keep_best=False: it kept its best epoch"),
        ({"keep_best": False}, None, r"with eval_data \(--eval-data\) and this run has none"),
        ({"keep_best": False}, "other", r"with other eval_data \(--eval-data\) than this run's"),
    ],
)
def test_a_checkpoint_scored_otherwise_is_refused(tiny, tmp_path, first, then, words):
    """The epochs before the checkpoint were scored (and kept) as the first run said: a run
    that scores or keeps otherwise would mix them (keep_best could pick among the later
    epochs only)."""
    model, data, (xt, yt) = tiny
    ck = tmp_path / "ck"
    ev1 = (xt, yt) if first else None
    compactnn.train(model, "w4a4-lsq", data, checkpoint_dir=ck, max_steps=2, eval_data=ev1,
                    **first, **KW)  # fmt: skip
    if then is None:
        kw = {}
    elif then == "other":
        kw = {"eval_data": (xt[:64], yt[:64])}
    else:
        kw = {"eval_data": (xt, yt), **then}
    with pytest.raises(CompactnnError, match=rf"^checkpoint .*{words}.*resume=False"):
        compactnn.train(model, "w4a4-lsq", data, checkpoint_dir=ck, **kw, **KW)
    same = {"eval_data": ev1, **first}  # the same scoring resumes
    compactnn.train(model, "w4a4-lsq", data, checkpoint_dir=ck, **same, **KW)


def test_train_leaves_the_callers_global_rng_as_it_was(tiny):
    model, data, _ = tiny
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = compactnn.train(model, "w4a4-lsq", data, epochs=1, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(CompactnnError):  # put back on an error too
        compactnn.train(model, "w4a4-lsq", data, epochs=0, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(6)  # another caller state: the same run
    b = compactnn.train(model, "w4a4-lsq", data, epochs=1, seed=0, progress=False)
    assert _same_weights(a, b)
