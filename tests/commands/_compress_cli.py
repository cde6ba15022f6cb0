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


def fake_generate(made: list):
    """A stand-in for ``compactnn.datafree.generate`` (the real one takes seconds): 16 seeded
    random inputs of the asked shape, labels 0; each call's ``input_shape`` goes to ``made``."""
    import torch

    from compactnn.datafree.common import GeneratedData

    def generate(net, n, input_shape, seed, progress):
        made.append(input_shape)
        x = torch.randn(16, *input_shape, generator=torch.Generator().manual_seed(0))
        return GeneratedData(x, torch.zeros(16, dtype=torch.long), {"seconds": 0.0})

    return generate
