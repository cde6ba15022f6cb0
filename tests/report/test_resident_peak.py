"""A report row keeps the peak its delivered model reached while it was built and run."""

from __future__ import annotations

from compactnn.measure import memory
from compactnn.measure.memory import ResidentMemory
from compactnn.report.resident import measure_job, measure_rows

JOB = {"artifact": "out/w8a8", "delivery": "deploy", "detail": "onednn", "batch": "b",
       "skeleton": "f"}  # fmt: skip


def test_rows_carry_the_peak_above_the_same_reading_as_resident_bytes(monkeypatch):
    def fake(builder, args, **kw):
        return ResidentMemory(before=100, after=160, peak=1100, anon_before=10, anon_after=30,
                              peak_reset=True)  # fmt: skip

    monkeypatch.setattr(memory, "resident_memory", fake)
    rows = [{"notes": []}]
    measure_rows([(rows[0], JOB)], threads=1)
    assert rows[0] == {"notes": [], "resident_bytes": 60, "resident_anon_bytes": 20,
                       "peak_bytes": 1000}  # fmt: skip


def test_a_peak_that_may_predate_the_build_is_left_out(monkeypatch):
    # no reset (a kernel before 4.0, or /proc/self/clear_refs not writable): the high-water
    # mark may be the imports' or the setup's, so the row gets no peak rather than a wrong one
    monkeypatch.setattr(
        memory, "resident_memory", lambda *a, **k: ResidentMemory(before=100, after=160, peak=999)
    )
    fields, note = measure_job(JOB, 1)
    assert fields == {"resident_bytes": 60, "resident_anon_bytes": 0} and note is None
