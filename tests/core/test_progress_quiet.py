"""A bar that is not drawn builds no tqdm: tqdm's first bar starts its ``tqdm_monitor``
thread, which then lives as long as the process (a notebook's kernel), so ``progress=False``
(or a log for stderr) must leave no thread behind."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import tqdm

from compactnn.core.progress import bar


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    monkeypatch.delenv("COMPACTNN_PROGRESS", raising=False)


@pytest.fixture
def no_tqdm(monkeypatch):
    """Fail any tqdm built during the test."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError("a tqdm was built for a bar that is not drawn")

    monkeypatch.setattr(tqdm.std.tqdm, "__new__", refuse)


def test_an_undrawn_bar_iterates_and_takes_every_call_compactnn_makes(no_tqdm):
    b = bar(range(4), progress=False, desc="steps", leave=False, initial=1, unit="it")
    assert list(b) == [0, 1, 2, 3] and b.disable and b.total == 4 and b.n == 1
    b.update()
    b.update(2)
    assert b.n == 4
    b.set_postfix(loss="0.1", refresh=True)
    b.set_postfix_str("layer")
    b.close()
    with bar(total=3, progress=False, desc="report") as c:
        c.update(1)
        c.set_postfix_str("timing")
    assert (c.n, c.total) == (1, 3)


def test_a_bar_with_progress_but_no_terminal_builds_no_tqdm_either(no_tqdm, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log: no terminal
    assert list(bar(["a", "b"], progress=True, desc="x")) == ["a", "b"]
    assert sys.stderr.getvalue() == ""


def test_compress_without_progress_leaves_no_tqdm_monitor_thread():
    code = textwrap.dedent(
        """
        import threading, warnings, torch, compactnn
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)
        ).eval()
        calib = torch.randn(16, 1, 8, 8)
        compactnn.compress(model, "w4a8", calib_data=calib, progress=False)
        print(sorted(t.name for t in threading.enumerate()))
        import tqdm  # the control: any tqdm, even a disabled one, starts the monitor
        tqdm.tqdm(disable=True)
        print(sorted(t.name for t in threading.enumerate()))
        """
    )
    run = [sys.executable, "-c", code]
    done = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    after_compress, after_control = done.stdout.splitlines()[-2:]
    assert "MainThread" in after_compress and "tqdm_monitor" not in after_compress
    assert "tqdm_monitor" in after_control
