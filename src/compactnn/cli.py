"""The ``compactnn`` command: argument parsing only; each subcommand lives in
:mod:`compactnn.commands` (a module with ``add_parser(subparsers)`` and ``run(args) -> int``).

Every :class:`~compactnn.errors.CompactnnError` is printed as ``error: <message>`` and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from compactnn.commands import COMMANDS
from compactnn.errors import CompactnnError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per module listed in ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="compactnn",
        description="Make trained PyTorch networks smaller and faster while keeping accuracy.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"compactnn.commands.{name}")
        sub_parser = module.add_parser(sub)
        sub_parser.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from compactnn import __version__

    return f"compactnn {__version__}"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one plain line (``warning: ...``), not a source-code excerpt."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return int(args._run(args) or 0)
    except CompactnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
