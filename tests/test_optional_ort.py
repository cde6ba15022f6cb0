"""ONNX Runtime imported through compactnn keeps its warnings (the coloured "Failed to persist
telemetry device ID" line of an unwritable HOME) out of the user's stderr, not its errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compactnn import _optional

pytest.importorskip("onnxruntime")

W_LINE = (
    b"\x1b[0;93m2026-12-06 22:16:12.206647557 [W:onnxruntime:Default, telemetry_1ds.cc:613 "
    b"operator()] Failed to persist telemetry device ID; using an in-memory identifier\x1b[m\n"
)
E_LINE = b"2026-12-06 22:16:12.3 [E:onnxruntime:Default, env.cc:1 Init] could not load\n"


def _stderr_of(code: str) -> str:
    env = {**os.environ, "HOME": "/dev/null", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_an_unwritable_home_gives_no_onnxruntime_warning_through_require():
    plain = _stderr_of("import onnxruntime")
    if "telemetry" not in plain:
        pytest.skip("this onnxruntime does not warn about its telemetry device ID")
    code = (
        "from compactnn._optional import require; ort = require('onnxruntime', 'onnx'); print('ok')"
    )
    assert _stderr_of(code) == ""


def test_the_import_keeps_errors_and_other_output_and_drops_minor_lines(capfd):
    with _optional._ort_import_output():
        os.write(2, b"plain text\n" + W_LINE + E_LINE + b"[I:onnxruntime:, x.cc:1 f] info\n")
    err = capfd.readouterr().err
    assert err == "plain text\n" + E_LINE.decode()


def test_minor_lines_are_only_onnxruntimes_own_warnings_and_below():
    kept = _optional._without_minor_ort_lines(W_LINE + E_LINE + b"[W:other:x] keep\nend")
    assert kept == E_LINE + b"[W:other:x] keep\nend"


def test_the_default_logger_is_at_error_after_require(monkeypatch):
    import onnxruntime

    calls = []
    monkeypatch.setattr(onnxruntime, "set_default_logger_severity", calls.append)
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setattr(_optional.importlib, "import_module", lambda name: onnxruntime)
    assert _optional.require("onnxruntime", "onnx") is onnxruntime
    assert calls == [3]
