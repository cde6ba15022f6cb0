"""Standard output and error of the command line, made safe to write whatever they point at.

Two failures a command must not turn into a traceback after its work is done (an artifact
saved, then its summary line fails):

* **Text the stream's encoding lacks**: a recipe named ``récette`` printed under
  ``PYTHONIOENCODING=ascii``, or a path with undecodable bytes (``surrogateescape``) under
  ``PYTHONIOENCODING=utf-8``. Both streams get the ``compactnn-escape`` error handler: an
  undecodable byte of a path goes out as that byte (as ``surrogateescape`` writes it, so the
  path pastes back), any other unencodable character as a ``\\xe9``-style escape.
* **A stream that cannot be written** (``> /dev/full``, a disk filling up): the write's
  ``OSError`` carries no file name, so the command line could not tell it from a bug; it
  becomes :class:`StdoutError`, one ``error:`` line (status 2). A closed pipe stays a
  ``BrokenPipeError`` (``compactnn ... | head -1``: nothing to say).
"""

from __future__ import annotations

import codecs
import contextlib
import re
import sys
from collections.abc import Iterator
from typing import Any

from compactnn.errors import CompactnnError

HANDLER = "compactnn-escape"


def _escape(exc: UnicodeError) -> tuple[str | bytes, int]:
    """``surrogateescape`` for the bytes it stands for, ``backslashreplace`` for the rest.

    Example:
        >>> "r\\xe9\\udce9".encode("ascii", HANDLER)
        b'r\\\\xe9\\xe9'
    """
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start : exc.end]:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte carried by surrogateescape
            out.append(code - 0xDC00)
        else:
            out += ch.encode("ascii", "backslashreplace")
    return bytes(out), exc.end


codecs.register_error(HANDLER, _escape)


_ESCAPED_BYTE = re.compile(r"\\udc([89a-fA-F][0-9a-fA-F])")


def raw_bytes(text: str) -> str:
    """``text`` with the ``\\udcXX`` escapes a path's ``repr`` writes for its undecodable
    bytes turned back into those bytes' surrogates, so the stream writes the bytes themselves
    and a quoted path in a message reads as the same path on stdout (as ``ls`` shows it).
    Only where stderr writes such surrogates as bytes (:func:`tolerant_streams`).
    """
    if getattr(sys.stderr, "errors", None) not in (HANDLER, "surrogateescape"):
        return text  # a stream that would refuse the surrogates: keep the escapes
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)


class StdoutError(CompactnnError):
    """Standard output could not be written (a full disk, an I/O error)."""


class _Guarded:
    """``stream`` whose failed writes say they failed on standard output."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._call(self._stream.write, text)

    def flush(self) -> None:
        self._call(self._stream.flush)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutError(
                f"cannot write to standard output: {exc.strerror or exc}; redirect it to a "
                "file on a disk with room (what the command wrote before this line, e.g. "
                "an artifact, is complete)."
            ) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _set_errors(stream: Any, errors: str) -> str | None:
    """Give ``stream`` the error handler ``errors``; its previous one, None if it has none."""
    before = getattr(stream, "errors", None)
    if before is None or not hasattr(stream, "reconfigure"):
        return None
    try:
        stream.reconfigure(errors=errors)
    except (ValueError, OSError):  # closed, or a stream that refuses it
        return None
    return before


@contextlib.contextmanager
def tolerant_streams() -> Iterator[None]:
    """Within the body, stdout and stderr escape what they cannot encode, and a failed
    write to stdout raises :class:`StdoutError`; both are restored after."""
    out, err = sys.stdout, sys.stderr
    before = {s: _set_errors(s, HANDLER) for s in (out, err) if s is not None}
    if out is not None:
        sys.stdout = _Guarded(out)  # type: ignore[assignment]
    try:
        yield
    finally:
        if isinstance(sys.stdout, _Guarded):
            sys.stdout = sys.stdout._stream
        for stream, errors in before.items():
            if errors is not None:
                _set_errors(stream, errors)
