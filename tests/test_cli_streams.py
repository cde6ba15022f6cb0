"""The command line's stdout/stderr: unencodable text escaped, a failed write one line.

``cli_streams.tolerant_streams`` (used by ``cli.main`` for the real command line).
"""

import io
import os
import subprocess
import sys

import pytest

from compactnn import cli_streams
from compactnn.cli_streams import StdoutError, tolerant_streams


def ascii_stream():
    raw = io.BytesIO()
    return raw, io.TextIOWrapper(raw, encoding="ascii", errors="strict", write_through=True)


def test_unencodable_text_is_escaped_and_undecodable_path_bytes_go_out_raw(monkeypatch):
    raw, stream = ascii_stream()
    monkeypatch.setattr(sys, "stdout", stream)
    with tolerant_streams():
        print("r\u00e9cette p\udce9")  # a recipe name; a path holding the byte 0xe9
    assert raw.getvalue() == b"r\\xe9cette p\xe9\n"
    assert sys.stdout is stream and stream.errors == "strict"  # restored


def test_without_the_streams_the_same_print_fails(monkeypatch):
    _, stream = ascii_stream()
    with pytest.raises(UnicodeEncodeError):
        print("r\u00e9cette", file=stream)


class Failing(io.StringIO):
    def __init__(self, exc):
        super().__init__()
        self.exc = exc

    def write(self, text):
        raise self.exc


def test_a_full_disk_on_stdout_is_a_user_error_and_a_closed_pipe_stays_one(monkeypatch):
    monkeypatch.setattr(sys, "stdout", Failing(OSError(28, "No space left on device")))
    with pytest.raises(StdoutError, match="cannot write to standard output: No space left"):
        with tolerant_streams():
            print("summary")
    monkeypatch.setattr(sys, "stdout", Failing(BrokenPipeError(32, "Broken pipe")))
    with pytest.raises(BrokenPipeError):
        with tolerant_streams():
            print("summary")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_the_command_line_says_one_line_when_stdout_is_full():
    code = "import sys; from compactnn.cli import main; sys.exit(main())"
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-c", code, "--version"], stdout=full, stderr=subprocess.PIPE,
            text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot write to standard output: No space left")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_the_handler_is_registered_under_its_name():
    assert "\udcff".encode("ascii", cli_streams.HANDLER) == b"\xff"


def test_a_quoted_path_s_undecodable_bytes_reach_stderr_as_those_bytes(monkeypatch):
    """An error quoting a path held '\\udcc3' escapes (the path's repr) where stdout wrote
    the bytes: under the command line's streams both write the bytes."""
    from compactnn.cli_streams import raw_bytes

    raw, stream = ascii_stream()
    monkeypatch.setattr(sys, "stderr", stream)
    path = os.fsdecode(b"mod\xe8le")  # a Latin-1 name on a UTF-8 system
    with tolerant_streams():
        print(raw_bytes(f"error: --out {path!r} already holds an artifact"), file=sys.stderr)
    assert raw.getvalue() == b"error: --out 'mod\xe8le' already holds an artifact\n"
    assert raw_bytes(repr(path)) == repr(path)  # outside them: the escapes stay (strict stream)
