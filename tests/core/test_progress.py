"""Progress bars: drawn on a terminal only (a log gets no carriage-return frames),
``COMPACTNN_PROGRESS=1`` forces them, and ``TERM=dumb`` gets plain ASCII bars."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from compactnn.core.progress import bar, bar_options
from compactnn.measure.quality import evaluate


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (a UTF-8 one, as a real one says)."""

    @property
    def encoding(self) -> str:
        return "utf-8"

    def isatty(self) -> bool:
        return True


class _Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    monkeypatch.delenv("COMPACTNN_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")


def test_no_bar_when_progress_is_off_even_on_a_terminal():
    assert bar_options(False, _Terminal(), {"TERM": "xterm"}) == {"disable": True}
    forced = {"TERM": "xterm", "COMPACTNN_PROGRESS": "1"}
    assert bar_options(False, _Terminal(), forced) == {"disable": True}


def test_a_terminal_gets_a_bar_and_a_file_or_pipe_none():
    assert bar_options(True, _Terminal(), {"TERM": "xterm"}) == {"disable": False}
    assert bar_options(True, io.StringIO(), {"TERM": "xterm"}) == {"disable": True}
    assert bar_options(True, None, {}) == {"disable": True}  # pythonw: no stderr at all
    assert bar_options(True, _Closed(), {}) == {"disable": True}


def test_compactnn_progress_1_forces_the_bar_and_only_1_does():
    assert bar_options(True, io.StringIO(), {"COMPACTNN_PROGRESS": "1"}) == {"disable": False}
    for value in ("0", "", "yes"):
        env = {"COMPACTNN_PROGRESS": value}
        assert bar_options(True, io.StringIO(), env) == {"disable": True}, value


def test_a_dumb_terminal_gets_ascii_bars():
    assert bar_options(True, _Terminal(), {"TERM": "dumb"}) == {"disable": False, "ascii": True}


def _frames(monkeypatch, stream, env: dict[str, str]) -> str:
    """What a real evaluate(progress=True) writes to ``stream`` as stderr."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "stderr", stream)
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    evaluate(torch.nn.Linear(3, 2), (x, y), batch_size=4, progress=True)
    return stream.getvalue()


def test_evaluate_writes_no_bar_frames_into_a_log(monkeypatch):
    assert _frames(monkeypatch, io.StringIO(), {}) == ""


def test_evaluate_draws_its_bar_on_a_terminal_and_when_forced(monkeypatch):
    shown = _frames(monkeypatch, _Terminal(), {})
    assert "evaluate" in shown and "\r" in shown
    forced = _frames(monkeypatch, io.StringIO(), {"COMPACTNN_PROGRESS": "1"})
    assert "evaluate" in forced and "10it" in forced


def _drawn(monkeypatch, term: str) -> str:
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("TERM", term)
    with bar(total=4, progress=True, desc="work", ncols=60) as b:
        b.update(2)
    return stream.getvalue()


def test_a_dumb_terminal_bar_has_no_block_characters(monkeypatch):
    shown = _drawn(monkeypatch, "dumb")
    assert "work" in shown and "2/4" in shown and "#" in shown and shown.isascii()
    fancy = _drawn(monkeypatch, "xterm")  # the reference: the same bar on a full terminal
    assert "2/4" in fancy and "\u2588" in fancy


def test_bar_passes_its_other_options_to_tqdm(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    b = bar(range(3), progress=True, desc="steps", leave=False)
    assert list(b) == [0, 1, 2] and b.desc == "steps" and b.leave is False
    assert bar(total=5, progress=False).disable


def test_every_bar_of_compactnn_goes_through_the_helper():
    """A direct ``tqdm(...)`` elsewhere would draw its frames into logs again."""
    import re
    from pathlib import Path

    import compactnn

    root = Path(compactnn.__file__).parent
    allowed = {"core/progress.py", "training/loop.py"}  # loop.py: edited by another change
    direct = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"(?<![\w.])tqdm\(", p.read_text(encoding="utf-8"))
        and str(p.relative_to(root)) not in allowed
    ]
    assert direct == []
