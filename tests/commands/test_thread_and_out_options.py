"""``--threads`` is capped at argument parsing (torch crashes with 100,000 threads), the
``--tolerance`` message names its unit, and ``compactnn demo`` checks ``--out`` before it
loads any model."""

from __future__ import annotations

import argparse
import os

import pytest

from compactnn.cli import build_parser
from compactnn.commands import _common
from compactnn.demo import run_demo
from compactnn.errors import CompactnnError


def test_threads_up_to_the_cap_pass_and_more_are_refused_in_one_line():
    cpus = os.cpu_count() or 1
    cap = max(64, 4 * cpus)
    assert _common.thread_cap() == cap
    assert _common.thread_count("2") == 2
    assert _common.thread_count(str(cpus)) == cpus
    assert _common.thread_count(str(cap)) == cap
    with pytest.raises(argparse.ArgumentTypeError) as err:
        _common.thread_count("100000")
    message = str(err.value)
    assert message.startswith(f"'100000' threads is more than {cap} (4 per CPU, at least 64;")
    assert f"this machine has {cpus} CPUs" in message and "torch crashes" in message
    assert "e.g. 2 (the default)" in message and "\n" not in message
    with pytest.raises(argparse.ArgumentTypeError, match="'0' is not a whole number of 1"):
        _common.thread_count("0")


@pytest.mark.parametrize("command", ["eval", "deploy", "report", "demo"])
def test_every_command_with_threads_refuses_too_many_at_parsing(command, capsys):
    base = {"demo": [], "report": ["art", "--data", "x.npy", "--out", "r"]}.get(command, ["art"])
    argv = [command, *base, "--threads", "100000"]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "argument --threads: '100000' threads is more than" in capsys.readouterr().err
    assert build_parser().parse_args([command, *base, "--threads", "2"]).threads == 2


def test_tolerance_message_says_the_default_and_its_unit(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["deploy", "art", "--tolerance", "nan"])
    assert (
        "argument --tolerance: 'nan' is not a finite number of 0 or more, e.g. 2 (the default, "
        "in steps of the output scale)" in capsys.readouterr().err
    )
    assert build_parser().parse_args(["deploy", "art", "--tolerance", "0"]).tolerance == 0.0


def _no_model(name):
    raise AssertionError(f"the demo loaded {name} before checking --out")


@pytest.mark.parametrize("where", ["/proc/compactnn-demo", "file"])
def test_demo_checks_out_before_loading_any_model(where, tmp_path):
    if where == "file":
        (tmp_path / "a-file").write_text("mine")
        where = str(tmp_path / "a-file" / "demo")
    with pytest.raises(CompactnnError) as err:
        run_demo(where, suite=[("tiny", "float"), ("tiny", "w8a8")], loader=_no_model)
    message = str(err.value)
    assert "a system folder" in message or "is a file" in message
    if "a-file" in where:
        assert (tmp_path / "a-file").read_text() == "mine"
