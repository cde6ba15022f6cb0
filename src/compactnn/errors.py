"""The one exception type compactnn raises for user mistakes.

The CLI catches it and prints its message without a traceback; library users can catch it
to tell a bad input from a bug.
"""


class CompactnnError(ValueError):
    """A user-facing error: the message names the bad input and how to fix it."""


class ArtifactError(CompactnnError):
    """A saved artifact is missing, truncated, tampered with, or of an unknown format."""


def name_list(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` for a message, with ``", ..."`` when there are more."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def counted(n: int, noun: str) -> str:
    """``"1 layer"``, ``"3 layers"``: a count and its noun for a message."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (its type's name when empty), at most ``limit``
    characters: the part of a library's error worth quoting in a one-line message."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def cut(text: object, limit: int = 200) -> str:
    """``str(text)``, cut to ``limit`` characters with how many were left out: a value from a
    file or the command line quoted in a message stays one short line.

    Example:
        >>> cut("x" * 300, 10)
        'xxxxxxxxxx... (290 more characters)'
    """
    text = str(text)
    return (
        text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"
    )
