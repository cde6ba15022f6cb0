"""``compactnn compress`` compares the artifact with the float one in the right direction:
an artifact larger than float (a GRU kept in float plus the record) is "1.06x larger", not
"0.95x smaller"."""

from compactnn.commands.compress import float_comparison


def test_a_larger_artifact_is_said_larger():
    assert float_comparison(18_900, 17_900) == "float artifact 17.5 KiB, 1.06x larger"


def test_a_smaller_artifact_is_said_smaller():
    assert float_comparison(8_950, 17_900) == "float artifact 17.5 KiB, 2.00x smaller"
