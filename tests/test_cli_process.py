"""The process around a command: a passive OpenMP wait policy (re-exec), progress bars and
Ctrl-C, Hugging Face's own bars, a reader that closes the pipe early."""

from __future__ import annotations

import os

import pytest

from compactnn import cli
from compactnn.cli import main
from tests._cli import run_cli


def test_timed_commands_run_with_a_passive_openmp_wait_policy(monkeypatch):
    """libgomp reads OMP_WAIT_POLICY when torch loads it: where a caller loaded torch before
    the command (OpenMP loaded), the command re-executes itself once with PASSIVE set,
    unless the user chose a policy (issue 13: 6-23x swings); the console script itself loads
    no torch first and sets it in place (tests/test_omp_policy.py)."""
    import sys

    from compactnn import cli
    from compactnn import omp_policy as reexec

    execs = []

    def fake_execv(path, argv):
        execs.append((path, argv, reexec.os.environ.get("OMP_WAIT_POLICY")))
        raise SystemExit(0)

    monkeypatch.setattr(reexec.os, "execv", fake_execv)
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", reexec.REEXEC_MARK):
        monkeypatch.setenv(var, "")  # recorded, so that what main sets is undone after
        monkeypatch.delenv(var)
    monkeypatch.setattr(sys, "argv", ["compactnn", "eval", "no-such-artifact"])
    monkeypatch.setattr(sys, "path", ["/venv/bin", *sys.path[1:]])  # the `compactnn` script
    monkeypatch.setattr(cli, "openmp_runtime_loaded", lambda: True)  # torch imported first
    with pytest.raises(SystemExit):
        cli.main()
    assert execs == [
        (sys.executable, [sys.executable, "-P", "-m", "compactnn.cli", "eval", "no-such-artifact"],
         "PASSIVE")
    ]  # fmt: skip
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice: kept, no re-exec
    assert cli.main() == 2 and len(execs) == 1
    monkeypatch.delenv("OMP_WAIT_POLICY")  # no OpenMP loaded yet: set here, no re-exec
    monkeypatch.delenv(reexec.REEXEC_MARK)
    monkeypatch.setattr(cli, "openmp_runtime_loaded", lambda: False)
    assert cli.main() == 2 and len(execs) == 1 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(sys, "argv", ["compactnn", "recipes"])  # computes nothing: untouched
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert cli.main() == 0 and "OMP_WAIT_POLICY" not in os.environ


def _rendered_lines(text: str) -> list[str]:
    """``text`` as a terminal shows it: a carriage return goes back to the start of the
    line and later characters overwrite earlier ones."""
    lines = []
    for raw in text.split("\n"):
        shown: list[str] = []
        col = 0
        for part in raw.split("\r"):
            shown[col : col + len(part)] = part  # overwrite from column 0
            col = 0
        lines.append("".join(shown).rstrip())
    return lines


@pytest.mark.parametrize("leave", [False, True])
def test_ctrl_c_during_a_progress_bar_prints_interrupted_on_its_own_line(
    monkeypatch, capsys, leave
):
    from tqdm.auto import tqdm

    from compactnn.commands import recipes

    def run(args):
        bar = tqdm(total=10, desc="epoch 1/3", leave=leave)  # kept open, as a training loop's
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "run", run)
    code, _out, err = run_cli(capsys, "recipes")
    assert code == 130
    shown = [line for line in _rendered_lines(err) if line]
    assert shown[-1] == "interrupted", repr(err)  # alone on its line, and nothing after it


def test_no_progress_hides_hugging_faces_own_bars(monkeypatch, capsys):
    """A reference transformer (minilm) printed transformers' "Loading weights" bar under
    --no-progress: only a Hugging Face directory switched it off."""
    from compactnn.commands import _common

    hide_hf_progress = _common.hide_hf_progress  # the real one, for the second half
    calls = []
    monkeypatch.setattr(_common, "hide_hf_progress", lambda: calls.append(1))
    from compactnn.core import progress

    monkeypatch.delenv(progress.FORCE_VARIABLE, raising=False)
    monkeypatch.setattr(progress, "is_terminal", lambda stream: True)
    main(["compress", "no-such-model", "-r", "w8", "-o", "x", "--no-progress"])
    assert calls == [1]
    main(["compress", "no-such-model", "-r", "w8", "-o", "x"])
    assert calls == [1]  # bars stay on a terminal without the option
    monkeypatch.setattr(progress, "is_terminal", lambda stream: False)
    main(["compress", "no-such-model", "-r", "w8", "-o", "x"])
    assert calls == [1, 1]  # a log (no terminal): Hugging Face's bars hidden too
    capsys.readouterr()
    pytest.importorskip("transformers")
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    try:
        hide_hf_progress()
        assert are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
    finally:
        enable_progress_bars()
        hf_logging.enable_progress_bar()


def test_every_command_that_computes_runs_with_a_passive_openmp_policy():
    """A new command is not forgotten: spinning OpenMP threads made compress 6x slower on a
    loaded machine, not only the timings."""
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert names - cli.PASSIVE_COMMANDS == {"recipes"}  # lists names, computes nothing
    assert cli.PASSIVE_COMMANDS <= names


def test_a_reader_that_leaves_the_pipe_early_gets_no_traceback(tmp_path):
    """`compactnn compress ... | head -1`: printing into the closed pipe ends quietly."""
    import subprocess
    import sys

    code = (
        "import compactnn.cli as c, sys\n"
        "def run(args):\n"
        "    for i in range(100000): print('line', i)\n"
        "    return 0\n"
        "c.build_parser = (lambda b: lambda: (p := b(), p._subparsers._group_actions[0]"
        ".choices['recipes'].set_defaults(_run=run), p)[2])(c.build_parser)\n"
        "sys.exit(c.main(['recipes']))\n"
    )
    proc = subprocess.run(
        f"{sys.executable} -c \"{code}\" | head -1",
        shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.stdout == "line 0\n"
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_the_re_execution_imports_nothing_from_the_current_folder(tmp_path):
    """A `tqdm.py` in the folder where `compactnn` runs (a downloaded model folder) is never
    imported: the passive-policy re-execution used `python -m`, which put that folder first
    on sys.path (security review, session 30)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "compactnn"
    if not script.exists():
        script = Path(shutil.which("compactnn") or "")
    if not script.is_file():
        pytest.skip("the compactnn console script is not installed")
    marker = tmp_path / "MARKER"
    for name in ("tqdm", "numpy", "yaml"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('{name}')\n")
    drop = ("OMP_WAIT_POLICY", "PYTHONPATH", "COMPACTNN_OMP_REEXEC")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    proc = subprocess.run(
        [str(script), "eval", "no-such-artifact"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert not marker.exists(), f"imported {marker.read_text()}.py from the current folder"
    assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr[-2000:]


def test_version_answers_without_loading_torch():
    import subprocess
    import sys

    code = "import sys; from compactnn.cli import main; main(); print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code, "--version"], capture_output=True, text=True
    )
    assert proc.stdout.split() == ["compactnn", "0.1.0", "False"], proc.stderr[-2000:]


def test_a_library_force_hint_reads_as_the_flag_on_the_command_line():
    """A save that finds another run's artifact in its folder meanwhile says --force (T6)."""
    from compactnn.cli import with_hints
    from compactnn.errors import CompactnnError

    exc = CompactnnError(
        "path 'conc' already holds a compactnn artifact; pass force=True to replace it."
    )
    assert with_hints(exc).endswith("pass --force to replace it.")
