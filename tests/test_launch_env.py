"""``env_rank``: the rank torchrun gives a process, against the variables it sets."""

import pytest

from compactnn.launch_env import env_rank


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1),  # torchrun's second process
        ({"RANK": "0", "WORLD_SIZE": "4"}, 0),
        ({"RANK": "3"}, 0),  # a RANK left in a plain shell
        ({"RANK": "2", "WORLD_SIZE": "2"}, 0),  # outside 0 .. WORLD_SIZE - 1
        ({"RANK": "x", "WORLD_SIZE": "2"}, 0),
        ({"RANK": "1", "WORLD_SIZE": ""}, 0),
    ],
)
def test_env_rank(env, rank):
    assert env_rank(env) == rank


def test_env_rank_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert env_rank() == 1
    monkeypatch.delenv("WORLD_SIZE")
    assert env_rank() == 0
