"""Every ``compactnn COMMAND --help`` fits an 80-column terminal, and says what its options
take (``compress --data``: the forms compress reads, not a data set name it refuses)."""

import argparse

import pytest

from compactnn import cli
from compactnn.commands import compress as compress_cmd
from compactnn.errors import CompactnnError
from compactnn.model_io import reference_names, resolve_data


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return {"compactnn": parser, **parser._subparsers._group_actions[0].choices}


@pytest.mark.parametrize("name", list(_parsers()))
def test_every_help_line_fits_80_columns(monkeypatch, name):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width less 2
    text = _parsers()[name].format_help()
    long = [f"{len(line)}: {line}" for line in text.splitlines() if len(line) > 80]
    assert long == []


def test_compress_data_help_names_the_forms_compress_reads():
    parser = argparse.ArgumentParser()
    sub = compress_cmd.add_parser(parser.add_subparsers())
    action = next(a for a in sub._actions if "--data" in a.option_strings)
    text = " ".join(action.help.split())
    assert "data set name" not in text  # compress reads no data set names ...
    with pytest.raises(CompactnnError, match="reference model's name"):
        resolve_data("mnist")  # ... and refuses one
    assert "reference model's name (its calibration batches" in text
    assert ".safetensors" in text and ".npy" in text and "'data-free'" in text
    assert "mnist-cnn" in reference_names()  # the example the help gives is one
    assert "e.g. mnist-cnn" in text
