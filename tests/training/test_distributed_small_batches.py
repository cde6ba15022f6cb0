"""Multi-process training at the edges: a global batch smaller than the number of ranks
(dropped, or refused up front), a DataLoader already split per rank (refused), the progress
bar's numbers (summed over the ranks, as the epoch line), and what each rank prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from compactnn.errors import CompactnnError
from compactnn.training.batch_norm import fit_batches
from compactnn.training.data import TrainData, as_train_data
from tests.training._ranks import free_port


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _xy(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4


# ---- one process: the rules, with world_size given ------------------------------------


def test_a_batch_size_below_the_number_of_processes_is_refused_naming_both():
    x, y = _xy(40)
    with pytest.raises(CompactnnError) as exc:
        fit_batches(_mlp(), TrainData(x=x, y=y), 1, x, world_size=2)
    text = str(exc.value)
    assert text.startswith("batch_size=1 with 40 training samples: ")
    assert "2 processes" in text and "batch_size: 2 or more" in text and "\n" not in text


def test_a_loaders_batch_size_below_the_number_of_processes_is_refused():
    x, y = _xy(40)
    data = as_train_data(DataLoader(TensorDataset(x, y), batch_size=3))
    with pytest.raises(CompactnnError, match=r"the DataLoader's batch_size=3 .* 4 processes"):
        fit_batches(_mlp(), data, 16, x[:3], world_size=4)


def test_data_with_fewer_samples_than_processes_is_refused():
    x, y = _xy(1)
    with pytest.raises(CompactnnError, match=r"holds 1 training sample .* at least 2"):
        fit_batches(_mlp(), TrainData(x=x, y=y), 16, x, world_size=2)


def test_a_last_batch_with_fewer_samples_than_processes_is_dropped_once_with_a_warning():
    x, y = _xy(385)
    data = TrainData(x=x, y=y)
    with pytest.warns(UserWarning, match=r"batch_size=64 leaves 1 of the 385 .* dropped") as rec:
        steps = fit_batches(_mlp(), data, 64, x[:2], world_size=2)
    assert len(rec) == 1
    assert steps == 385 // 64 == 6  # the 1 sample left over for 2 processes: no batch
    sizes = [len(b[0]) for b in data.batches(64, 0, 0)]
    assert sizes == [64] * 6
    with warnings.catch_warnings():  # one process: every batch kept, nothing said
        warnings.simplefilter("error")
        assert fit_batches(_mlp(), TrainData(x=x, y=y), 64, x[:2], world_size=1) == 7


def test_a_loaders_last_batch_with_fewer_samples_than_processes_is_skipped():
    x, y = _xy(33)
    data = as_train_data(DataLoader(TensorDataset(x, y), batch_size=16))  # 16, 16, 1
    with pytest.warns(UserWarning, match=r"DataLoader's batch_size=16 leaves 1 .*drop_last"):
        fit_batches(_mlp(), data, 16, x[:16], world_size=2)
    assert [len(b[0]) for b in data.batches(16, 0, 0)] == [16, 16]


@pytest.mark.parametrize("where", ["sampler", "batch_sampler"])
def test_a_loader_split_by_a_distributed_sampler_is_refused(where):
    x, y = _xy(40)
    ds = TensorDataset(x, y)
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, seed=0)
    if where == "sampler":
        loader = DataLoader(ds, batch_size=8, sampler=sampler)
    else:
        loader = DataLoader(ds, batch_sampler=BatchSampler(sampler, 8, drop_last=False))
    with pytest.raises(CompactnnError) as exc:
        as_train_data(loader)
    text = str(exc.value)
    assert "DistributedSampler" in text and "num_replicas=2" in text and "\n" not in text
    assert "global" in text and "shuffle=True" in text
    # one replica splits nothing: accepted
    one = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, num_replicas=1, rank=0))
    assert as_train_data(one).loader is one


# ---- two gloo processes ----------------------------------------------------------------

SCRIPT = r"""
import dataclasses, sys, torch
from torch import nn
import compactnn
from compactnn.recipe import Recipe, Step, resolve_recipe
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
n = int(sys.argv[2])
g = torch.Generator().manual_seed(1)
x = torch.randn(n, 12, generator=g)
y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
step = resolve_recipe("w4a4-lsq").steps[0]
config = dataclasses.replace(step.config, batch_size=16, epochs=1, lr=1e-2)
recipe = Recipe("w4a4-lsq", [Step(step.method, config, step.targets)])
q = compactnn.train(model, recipe, (x, y), seed=0, progress=True)
torch.save({"state": q.state_dict(), "history": q._compactnn["extra"]["training"]},
           sys.argv[1])
"""


def _two_ranks(tmp_path, n: int) -> list[tuple[str, str, dict]]:
    """Run SCRIPT on ``n`` samples as two gloo ranks; each rank's stdout, stderr, result."""
    port, procs = free_port(), []
    outs = [tmp_path / f"r{rank}.pt" for rank in range(2)]
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        env |= {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "COLUMNS": "200"}
        env["COMPACTNN_PROGRESS"] = "1"  # the bar even on a pipe (core/progress.py)
        cmd = [sys.executable, "-c", SCRIPT, str(outs[rank]), str(n)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    done = []
    for p, out in zip(procs, outs, strict=True):
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        done.append((stdout, stderr, torch.load(out, weights_only=True)))
    return done


def test_a_last_global_batch_of_one_sample_is_dropped_and_said_once(tmp_path):
    (_, err0, a), (out1, err1, b) = _two_ranks(tmp_path, 33)  # 16, 16, then 1 for 2 ranks
    assert a["history"]["steps"] == b["history"]["steps"] == 33 // 16
    for key in a["state"]:  # both ranks trained the same two batches
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert all(torch.isfinite(torch.tensor(a["history"]["loss"])))
    assert err0.count("batch_size=16 leaves 1 of the 33 training samples") == 1
    assert "leaves 1" not in err1 and "Warning" not in err1  # rank 1 says nothing
    assert out1 == ""


def test_the_progress_bar_shows_the_sums_over_the_ranks_as_the_epoch_line(tmp_path):
    (out0, err0, a), _ = _two_ranks(tmp_path, 64)  # 4 global batches of 16: 8 per rank
    loss = [float(v) for v in re.findall(r"loss=([0-9.]+)", err0)]
    acc = [float(v) for v in re.findall(r"acc=([0-9.]+)", err0)]
    assert loss and acc, err0[-2000:]
    line = re.search(r"train loss ([0-9.]+), train top-1 ([0-9.]+)%", out0)
    assert line is not None, out0
    # the bar's last numbers (3 and 1 decimals) are the epoch line's (4 and 2), rounded
    assert abs(loss[-1] - float(line[1])) <= 5e-4 + 1e-6
    assert abs(acc[-1] - float(line[2])) <= 5e-2 + 1e-6
    assert abs(float(line[1]) - a["history"]["loss"][-1]) <= 5e-5 + 1e-6


# ---- the command line under torchrun: rank 0 alone speaks ------------------------------

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
"""


def _cli_setup(tmp_path, monkeypatch) -> list[str]:
    from safetensors.torch import save_file

    (tmp_path / "rank_cli_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import rank_cli_factory

    save_file(rank_cli_factory.make().state_dict(), tmp_path / "w.safetensors")
    x, y = _xy(40)
    both = {"x_train": x[:32], "y_train": y[:32], "x_test": x[32:], "y_test": y[32:]}
    save_file(both, tmp_path / "both.safetensors")  # a held-out split: a "note:" line
    return ["train", "rank_cli_factory:make", "--weights", str(tmp_path / "w.safetensors"),
            "--recipe", "w4a4-lsq", "--data", str(tmp_path / "both.safetensors"),
            "--out", str(tmp_path / "out"), "--no-progress"]  # fmt: skip


def _torchrun_stops_this_rank(monkeypatch) -> list[float]:
    """torchrun's SIGTERM to a rank after rank 0 exited, sent while the rank waits for it:
    a ``time.sleep`` of the command line's that receives the signal (the waits asked for)."""
    import signal

    from compactnn import cli

    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(cli.time, "sleep", sleep)
    return waits


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize("stop", ["error", "interrupt", "sigterm"])
def test_the_command_prints_its_error_and_interrupt_lines_on_rank_0_alone(
    tmp_path, monkeypatch, capsys, rank, stop
):
    from compactnn import cli
    from compactnn.commands import train as train_command

    args = _cli_setup(tmp_path, monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    raised = {"error": CompactnnError("bad run"), "interrupt": KeyboardInterrupt()}
    raised["sigterm"] = cli.Terminated()

    def stopped(*_args, **_kwargs):
        raise raised[stop]

    monkeypatch.setattr(train_command, "_train_model", stopped)
    waits = _torchrun_stops_this_rank(monkeypatch)
    status = {"error": 2, "interrupt": 130, "sigterm": 143}[stop]
    if rank == "1" and stop == "error":  # waits for rank 0 to say it, stopped meanwhile
        with pytest.raises(SystemExit) as exc:
            cli.main(args)
        assert exc.value.code == status and waits == [cli.RANK_GRACE_S] and waits[0] >= 1
    else:
        assert cli.main(args) == status  # on every rank
        assert waits == []
    captured = capsys.readouterr()
    if rank == "1":
        assert captured.err == "" and captured.out == ""
        return
    last = {"error": "error: bad run", "interrupt": "interrupted"}
    assert captured.err.splitlines()[-1] == last.get(stop, "terminated (SIGTERM)")
    assert captured.err.startswith("note: --data ")


def test_a_refusal_before_any_work_is_printed_by_rank_0_alone(tmp_path, monkeypatch, capsys):
    from compactnn import cli

    args = _cli_setup(tmp_path, monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    _torchrun_stops_this_rank(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--epochs", "0"])
    assert exc.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main([*args, "--epochs", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --epochs 0 trains nothing")


def test_a_refusal_one_rank_met_alone_is_printed_by_it(tmp_path, monkeypatch, capsys):
    """Nobody stopped rank 1 while it waited: rank 0 did not fail, so the refusal is rank
    1's own, and it says so."""
    from compactnn import cli

    args = _cli_setup(tmp_path, monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "RANK_GRACE_S", 0.0)
    assert cli.main([*args, "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rank 1: error: --epochs 0 trains nothing") and err.count("\n") == 1


@pytest.mark.parametrize("world", [None, "1"])
def test_a_rank_left_in_a_plain_shell_is_not_a_silent_rank(tmp_path, monkeypatch, capsys, world):
    """``RANK=1`` without ``WORLD_SIZE`` (or beyond it) was not set by torchrun: the command
    speaks at once, as rank 0 of one, instead of waiting and exiting silently."""
    from compactnn import cli

    args = _cli_setup(tmp_path, monkeypatch)
    monkeypatch.setenv("RANK", "1")
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    waits = _torchrun_stops_this_rank(monkeypatch)
    assert cli.main([*args, "--epochs", "0"]) == 2
    assert waits == []
    assert capsys.readouterr().err.startswith("error: --epochs 0 trains nothing")


def test_train_saves_on_a_rank_left_in_a_plain_shell(monkeypatch):
    """``compactnn train`` saves only on rank 0: a RANK without WORLD_SIZE is rank 0 of one
    (it trained, then silently kept no artifact, exit 0)."""
    from compactnn.commands import train as train_command

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_command._is_rank0()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not train_command._is_rank0()
