"""Shared by the ``compactnn compress`` tests: run the command line, check a one-line
error."""

from __future__ import annotations

from compactnn.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(capsys, argv, *needles: str) -> str:
    code, _out, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err
