"""``compactnn compress ARTIFACT``: the artifact is named first (before the missing --data),
with the ways that work: a chained recipe from the float model, or compress(load(...))."""

from __future__ import annotations

import torch
from torch import nn

import compactnn
from tests.commands._compress_cli import assert_one_error_line


def test_an_artifact_as_model_is_named_before_data_with_the_ways_that_work(tmp_path, capsys):
    torch.manual_seed(0)
    art = tmp_path / "art"
    compactnn.save(compactnn.compress(nn.Sequential(nn.Linear(4, 4)), "w8", progress=False), art)
    argv = ["compress", str(art), "--recipe", "ch30", "--out", str(tmp_path / "o")]
    err = assert_one_error_line(
        capsys,
        argv,
        f"{str(art)!r} is a compactnn artifact, not a float model",
        "with a YAML recipe whose steps do both compressions in turn",
        f"compactnn.compress(compactnn.load({str(art)!r}, model=<its float model>), RECIPE",
    )
    assert "--data" not in err  # not "pass --data FILE" first
