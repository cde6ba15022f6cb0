"""`python -m compactnn.bench.lowbit_train2`: a missing or unknown PART is a usage line, not a
traceback or a silent sibnn run."""

import pytest

from compactnn.bench import lowbit_train2


@pytest.mark.parametrize("argv", [[], ["sibnn"], ["bogus", "0"], ["sibnn", "x"]])
def test_bad_arguments_exit_with_the_usage_line(argv, monkeypatch):
    monkeypatch.setattr(lowbit_train2, "run_sparsity_arms", lambda *a: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exit_:
        lowbit_train2.main(argv)
    message = str(exit_.value.code)
    assert message.startswith("usage: python -m compactnn.bench.lowbit_train2 PART SEED")
    assert "elq, elq-val, sibnn, pairs" in message and "\n" not in message


def test_a_known_part_and_seed_parse():
    assert lowbit_train2.parse_args(["pairs", "1"]) == ("pairs", 1)
