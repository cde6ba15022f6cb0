import pytest

from compactnn.errors import CompactnnError
from compactnn.quant.xnor import XNORConfig


def test_real_weight_epochs_must_leave_binary_epochs():
    with pytest.raises(CompactnnError, match="real_weight_epochs=6"):
        XNORConfig.from_short(1, 1, None, real_weight_epochs=6)
