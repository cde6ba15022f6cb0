"""``compactnn report``'s resident-memory rows stop at Ctrl-C / SIGTERM without waiting for
their children (it took up to 17 s to exit after SIGTERM at load 7)."""

import signal
import time

import pytest

from compactnn.errors import CompactnnError
from compactnn.measure import memory
from compactnn.report import resident


def test_report_rows_stop_at_an_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_job(job, threads):
        try:
            memory.resident_memory("time:sleep", [60])
        except CompactnnError as exc:
            return {}, str(exc)
        return {}, None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(resident, "measure_job", slow_job)
    previous = signal.signal(signal.SIGALRM, interrupt)
    rows = [({"notes": []}, {}), ({"notes": []}, {}), ({"notes": []}, {})]
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(KeyboardInterrupt):
            resident.measure_rows(rows, threads=1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < 15
    assert not memory._LIVE
