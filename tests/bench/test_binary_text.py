"""The binary section's text: peaks from a real clock, marked suspect timings, the spin
count when unset (bench/binary.py)."""

from __future__ import annotations

import pytest

from compactnn.bench import binary as bb
from compactnn.kernels import bitconv

ENV = {"machine": "test machine", "torch": "x", "date": "today"}
MMAC = 64 * 56 * 56 * 64 * 9  # one 64ch 56x56 layer, batch 1


def _row(int8_core_ms: float, popcount_core_ms: float, suspect=()) -> bb.BinaryRow:
    times = (2.0, 0.7, 0.33, int8_core_ms, popcount_core_ms)
    extra = (suspect,) if suspect else ()
    return bb.BinaryRow(64, 56, 1, 1, MMAC, *times, True, *extra)


@pytest.fixture
def fake_ext(monkeypatch):
    class Ext:
        def has_vpopcnt(self):
            return True

    monkeypatch.setattr(bitconv, "load_extension", lambda: Ext())
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)


def test_roofline_at_the_measured_clock_stays_under_100_percent(fake_ext):
    # the committed 64ch 56x56 b1 t1 row: int8 core 0.57 ms (406 GOP/s), popcount core 0.30 ms
    text = bb.to_markdown([_row(0.57, 0.30)], ENV, clock=(3.67, "measured: test"))
    assert "At 3.67 GHz (measured: test) the int8 VNNI peak is 64 MAC/cycle = 470 GOP/s" in text
    assert "popcount peak 512 binary MAC/cycle = 3758 GOP/s" in text
    assert "int8 core 86% of its peak, popcount core 21% of its peak" in text
    assert "above 100%" not in text


def test_a_share_above_100_percent_says_the_clock_is_low(fake_ext):
    text = bb.to_markdown([_row(0.57, 0.30)], ENV, clock=(2.60, "reported"))
    assert "int8 core 122% of its peak" in text
    assert "A share above 100% means the core ran faster than this clock" in text


def test_peak_clock_measures_vpdpbusd_before_the_reported_clock(monkeypatch):
    monkeypatch.setattr(bb, "vnni_ghz", lambda: 3.65)
    monkeypatch.setattr(bb, "cpu_ghz", lambda: 2.60)
    ghz, source = bb.peak_clock()
    assert ghz == 3.65 and "234 GMAC/s of CPU time on one thread" in source
    monkeypatch.setattr(bb, "vnni_ghz", lambda: None)
    monkeypatch.setattr(bb, "max_ghz", lambda: None)
    assert bb.peak_clock() == (2.60, bb.peak_clock()[1])
    assert "boost clock can be higher" in bb.peak_clock()[1]


@pytest.mark.skipif(
    not (bitconv.available() and bitconv.load_extension().has_vnni()), reason="no VNNI build"
)
def test_measured_vnni_clock_is_a_plausible_cpu_clock():
    assert 1.0 < bb.vnni_ghz(iters=10**7) < 6.5


def test_suspect_timings_are_marked_and_explained(fake_ext):
    why = "fp32: runs spread 377% around the median (2.01-10.15 ms): something else ran"
    text = bb.to_markdown([_row(0.57, 0.30, (why,))], ENV, clock=(3.67, "m"))
    assert "| 116 | 2.00 * | 0.70 | 0.33 | 0.57 | 0.30 |" in text
    assert "64ch 56x56 b1/t1 " + why in text


def test_unset_spin_count_is_printed_as_unset(fake_ext, monkeypatch):
    monkeypatch.setattr(bb, "peak_clock", lambda: (3.67, "m"), raising=False)
    text = bb.to_markdown([_row(0.57, 0.30)], ENV)
    assert "GOMP_SPINCOUNT=unset;" in text
