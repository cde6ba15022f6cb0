"""Progress bars that belong on a terminal and stay out of logs.

Every compactnn progress bar goes through :func:`bar`. A bar is drawn only when ``progress``
asks for one *and* it has a terminal to draw on: written to a file or a pipe (``2> log``,
a batch job, CI), tqdm's carriage-return frames would fill the log with dozens of
overwritten copies of the bar, so there is none (results and warnings still print).
``COMPACTNN_PROGRESS=1`` draws bars anyway; ``TERM=dumb`` draws them in plain ASCII. In a
Jupyter notebook the bar is a widget, drawn whatever stderr is. A bar that is not drawn is a
:class:`QuietBar`, not a disabled tqdm: tqdm's first bar starts its ``tqdm_monitor`` thread,
which would outlive the call (``progress=False`` leaves no thread behind).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as _chosen
from tqdm.std import tqdm as _console

FORCE_VARIABLE = "COMPACTNN_PROGRESS"
NOTEBOOK = _chosen is not _console  # tqdm.auto picked the notebook widget


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal; False for a file, a pipe, None or a closed stream."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def bar_options(
    progress: bool, stream: Any = None, env: Mapping[str, str] | None = None
) -> dict[str, bool]:
    """The tqdm options of a bar asked for with ``progress``, drawn on ``stream``.

    Example:
        >>> bar_options(False, None, {})
        {'disable': True}
        >>> bar_options(True, None, {"COMPACTNN_PROGRESS": "1", "TERM": "dumb"})
        {'disable': False, 'ascii': True}
    """
    env = os.environ if env is None else env
    shown = progress and (env.get(FORCE_VARIABLE) == "1" or NOTEBOOK or is_terminal(stream))
    options = {"disable": not shown}
    if shown and env.get("TERM") == "dumb":
        options["ascii"] = True
    return options


class QuietBar:
    """A bar that is not drawn: it iterates ``iterable`` and takes the calls compactnn makes
    on a tqdm (``update``, ``set_postfix``, ``set_postfix_str``, ``close``, ``with``).

    Example:
        >>> b = QuietBar(range(3), desc="steps")
        >>> list(b), b.total, b.disable
        ([0, 1, 2], 3, True)
    """

    disable = True

    def __init__(
        self, iterable: Any = None, total: float | None = None, initial: float = 0, **_: Any
    ):
        self.iterable = iterable
        self.n = initial
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, *_: Any, **__: Any) -> None:
        pass

    def set_postfix_str(self, *_: Any, **__: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> QuietBar:
        return self

    def __exit__(self, *_: Any) -> None:
        pass


def bar(iterable: Any = None, *, progress: bool, **kwargs: Any) -> tqdm | QuietBar:
    """``tqdm(iterable, **kwargs)``, drawn only where :func:`bar_options` says (on stderr,
    or the ``file=`` given); a :class:`QuietBar` where it is not drawn."""
    stream = kwargs.get("file") or sys.stderr
    options = bar_options(progress, stream)
    if options["disable"]:
        return QuietBar(iterable, **kwargs)
    return tqdm(iterable, **options, **kwargs)
