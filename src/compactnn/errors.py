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
