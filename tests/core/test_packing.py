import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compactnn.core.packing import pack_codes, packed_nbytes, unpack_codes
from compactnn.core.qtype import QType


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(1, 8), signed=st.booleans(), n=st.integers(1, 300), seed=st.integers(0, 1000)
)
def test_pack_round_trip_is_exact_and_dense(bits, signed, n, seed):
    if signed and bits == 1:
        signed = False
    qt = QType(bits, signed=signed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(qt.qmin, qt.qmax + 1, (n,), generator=g).to(qt.storage_dtype)
    packed = pack_codes(q, qt)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, qt, (n,)), q)


def test_pack_layout_is_msb_first():
    qt = QType(2, signed=False)
    q = torch.tensor([3, 0, 1, 2], dtype=torch.uint8)
    assert pack_codes(q, qt).tolist() == [0b11000110]
    qs = QType(4, signed=True)  # codes offset by -qmin = 8
    assert pack_codes(torch.tensor([-8, 7], dtype=torch.int8), qs).tolist() == [0x0F]
