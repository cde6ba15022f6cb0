"""mixed_precision/formats.py: the format list of a search (named apart from
tests/export/test_formats.py: pytest needs unique test module names)."""

import pytest

from compactnn.errors import CompactnnError
from compactnn.mixed_precision.formats import parse_formats


@pytest.mark.parametrize("names", ["w1a1-xnor,w4a8", ["w4a8", "w1a1-bireal", "w1a8-reactnet"]])
def test_binary_formats_are_refused_by_name(names):
    with pytest.raises(CompactnnError, match="binary blocks are not candidates") as err:
        parse_formats(names)
    assert "w1a1-" in str(err.value) or "w1a8-reactnet" in str(err.value)
    assert "w4a8'" not in str(err.value)


def test_integer_formats_still_parse():
    assert [f.name for f in parse_formats("w2a8,w4a8")] == ["w2a8", "w4a8"]
