"""What an artifact records of generated inputs (the same for two identical runs), and the
progress bar's loss."""

import json

import pytest
import torch

from compactnn import datafree
from compactnn.datafree import GeneratedData, generate

KEYS = ["data", "method", "images", "steps", "input_shape", "seed", "real_data"]


@pytest.mark.parametrize("method", ["bn-inversion", "dafl"])
def test_two_identical_runs_record_the_same_bytes_and_no_machine_numbers(tiny_teacher, method):
    runs = [
        generate(
            tiny_teacher, 6, input_shape=(1, 8, 8), method=method, steps=2, seed=3, progress=False
        )
        for _ in range(2)
    ]
    runs[1].cost["seconds"] += 1.0  # wall time differs from run to run: never recorded
    a, b = (json.dumps(datafree.artifact_record(d), sort_keys=True) for d in runs)
    assert a == b
    record = datafree.artifact_record(runs[0])
    assert list(record) == KEYS
    assert record == {
        "data": "data-free",
        "method": method,
        "images": 6,
        "steps": 2,
        "input_shape": [1, 8, 8],
        "seed": 3,
        "real_data": False,
    }
    assert runs[0].artifact_record() == record  # by name, for code below this package


def test_a_record_of_hand_made_data_has_the_same_keys():
    d = GeneratedData(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    record = datafree.artifact_record(d)
    assert list(record) == KEYS and record["images"] == 2 and record["seed"] is None


@pytest.mark.parametrize("method", ["bn-inversion", "dafl"])
def test_the_progress_bar_shows_the_loss(tiny_teacher, capsys, monkeypatch, method):
    monkeypatch.setenv("COMPACTNN_PROGRESS", "1")  # capsys is no terminal: bars forced on
    generate(tiny_teacher, 4, input_shape=(1, 8, 8), method=method, steps=3, progress=True)
    err = capsys.readouterr().err
    assert method.split("-")[0] in err and "loss=" in err
