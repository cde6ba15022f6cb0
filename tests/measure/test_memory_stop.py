"""A stopped caller does not wait for its resident-memory children: ``kill_children`` ends
the running ones, and their measurements fail at once (``compactnn report`` took up to 17 s to
exit after SIGTERM while its worker threads waited on them)."""

import threading
import time

import pytest

from compactnn.errors import CompactnnError
from compactnn.measure import memory


def test_kill_children_stops_a_running_measurement() -> None:
    errors: list[BaseException] = []

    def measure() -> None:
        try:
            memory.resident_memory("time:sleep", [60])  # the child builds for a minute
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=measure)
    worker.start()
    deadline = time.monotonic() + 60
    while not memory._LIVE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert memory._LIVE, "the child never started"
    start = time.monotonic()
    memory.kill_children()
    worker.join(30)
    assert not worker.is_alive() and time.monotonic() - start < 10
    assert len(errors) == 1 and isinstance(errors[0], CompactnnError)
    assert "exit -9" in str(errors[0])
    assert not memory._LIVE


def test_a_finished_child_leaves_no_entry() -> None:
    with pytest.raises(CompactnnError, match="failed"):
        memory.resident_memory("time:time", [])  # builds a float, not a callable
    assert not memory._LIVE


def test_the_child_imports_nothing_from_the_current_folder(tmp_path, monkeypatch) -> None:
    """`compactnn report` run in a folder holding a `numpy.py`: the measuring child (a
    `python -c`, which put the current folder first on sys.path) never imports it."""
    marker = tmp_path / "MARKER"
    for name in ("numpy", "tqdm", "json"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('{name}')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CompactnnError, match="failed"):
        memory.resident_memory("time:time", [])  # builds a float, not a callable
    assert not marker.exists(), f"the child imported {marker.read_text()}.py"
