"""The ``compactnn`` command: argument parsing only; each subcommand lives in
:mod:`compactnn.commands` (a module with ``add_parser(subparsers)`` and ``run(args) -> int``).

Every :class:`~compactnn.errors.CompactnnError` is printed as ``error: <message>`` and exits
with status 2, without a traceback. So is an ``OSError`` that names its file and is about
the disk or permissions (full disk, file too large, no access, read-only file system, name
too long): the user can fix those. A message is cut to about ``MAX_MESSAGE`` characters.
(The writers of :mod:`compactnn.export.fs` name the file of a failed write.) Any other
exception is a bug and keeps its traceback. Ctrl-C (SIGINT) and SIGTERM stop a command the
same way, its cleanup run (a training log removed, or kept where a checkpoint resumes it):
``interrupted`` and status 130, ``terminated (SIGTERM)`` and status 143.

OpenMP: every command that computes (``PASSIVE_COMMANDS``: all but ``recipes``) runs with
``OMP_WAIT_POLICY=PASSIVE`` and, while the load is below the CPU count, a bounded spin,
unless the user set a policy. OpenMP reads it
once, when torch loads it, and the package has loaded torch by the time this module runs, so
the command re-executes itself once with the policy set
(``measure.reexec.ensure_passive_policy``): spinning OpenMP threads inflated latencies 6-23x
on a loaded machine, and made ``compress --recipe w4a4-brecq`` of a small CNN take 120 s
instead of 20 s at load 6-7.
"""

from __future__ import annotations

import sys

OPENMP_LOADED = "torch" in sys.modules  # before our imports: was libgomp already loaded?

import argparse  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from compactnn.commands import COMMANDS  # noqa: E402
from compactnn.commands._common import close_progress_bars, hide_hf_progress  # noqa: E402
from compactnn.errors import CompactnnError, cut, first_line  # noqa: E402
from compactnn.measure.reexec import ensure_passive_policy  # noqa: E402
from compactnn.user_modules import user_folder_importable  # noqa: E402

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left
EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # 128 + SIGTERM (timeout, Slurm, systemd, kill)
# OSErrors the user fixes (free space, permissions, another path), with the hint to give.
USER_OS_ERRORS = {
    errno.ENOSPC: "free some disk space or choose another --out",
    errno.EDQUOT: "free some of your disk quota or choose another --out",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EROFS: "that file system is read-only: choose another path",
    errno.EFBIG: "the file outgrew the file-size limit (ulimit -f) or the file system's "
    "largest file: raise the limit or choose another path",
    errno.ENAMETOOLONG: "choose a shorter file or folder name",
}
# The longest ``error:`` line printed: a message quoting a value read from a file (a recipe
# name, an artifact's source) is cut here at the latest, saying how much was cut.
MAX_MESSAGE = 2000
# Set for the re-executed command while SIGINT is blocked across the exec (see main).
SIGINT_HELD = "COMPACTNN_SIGINT_HELD"
PASSIVE_COMMANDS = frozenset(
    {"compress", "eval", "demo", "train", "deploy", "report", "export", "search"}
)
# Command modules whose parser takes ``--plugin`` (all that read recipes or artifacts).
PLUGIN_COMMANDS = frozenset(COMMANDS) - {"demo"}
UNKNOWN_METHOD_HINT = "(a third-party method? import its module with --plugin MODULE)"


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
        if name in PLUGIN_COMMANDS:
            add_plugin_arg(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def add_plugin_arg(parser: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` (repeatable): a module that registers third-party methods."""
    parser.add_argument(
        "--plugin",
        metavar="MODULE",
        action="append",
        default=[],
        help="import this module (pkg.mod, importable from the current folder, PYTHONPATH or "
        "installed) before anything else, so the methods it registers can be used; repeatable",
    )


def import_plugins(names: Sequence[str]) -> None:
    """Import each ``--plugin`` module, the current folder importable (as for a MODEL
    factory); a module that cannot be imported is a one-line CompactnnError naming it."""
    for name in names:
        is_file = name.endswith(".py") and Path(name).is_file()
        if is_file or not all(part.isidentifier() for part in name.split(".")):
            stem = Path(name).stem if name.endswith(".py") else "pkg.module"
            raise CompactnnError(
                f"--plugin {name!r} is not a module name: give the module as Python imports "
                f"it, e.g. --plugin {stem} (run from the folder that holds it, or add that "
                "folder to PYTHONPATH)."
            )
        try:
            with user_folder_importable():
                importlib.import_module(name)
        except ImportError as exc:
            raise CompactnnError(
                f"--plugin {name!r} could not be imported ({first_line(exc)}): check the module "
                "name, and run from the folder that holds it or add that folder to PYTHONPATH."
            ) from exc
        except CompactnnError as exc:  # e.g. a registration the registry refuses
            raise CompactnnError(f"--plugin {name!r}: {exc}") from exc
        except SystemExit as exc:  # else the command would end there, status 0, no output
            code = cut(repr(exc.code), 60)
            raise CompactnnError(
                f"--plugin {name!r} called sys.exit({code}) while being imported: a plugin "
                "module should only register methods; remove the exit from it."
            ) from exc
        except Exception as exc:  # a bug in the plugin, not in compactnn
            raise CompactnnError(
                f"--plugin {name!r} failed while being imported ({type(exc).__name__}: "
                f"{first_line(exc)}): fix the module; python -c 'import {name}' shows where."
            ) from exc


def with_hints(exc: CompactnnError) -> str:
    """The message of ``exc``, with a hint about ``--plugin`` when an unknown method name
    caused it.

    Example:
        >>> from compactnn.registry import UnknownMethodError
        >>> with_hints(UnknownMethodError("pow2", "unknown method 'pow2'."))
        "unknown method 'pow2'. (a third-party method? import its module with --plugin MODULE)"
    """
    from compactnn.registry import UnknownMethodError

    message, cause = str(exc), exc
    while cause is not None and not isinstance(cause, UnknownMethodError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and "--plugin" not in message:
        message = f"{message} {UNKNOWN_METHOD_HINT}"
    return message


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` cut in the middle to about ``limit`` characters, saying how many were cut:
    the last line of defence against a value from a file quoted whole; its start (what is
    wrong) and its end (the fix) stay.

    Example:
        >>> bounded("recipe '" + "x" * 50 + "' has no steps.", limit=40)
        "recipe 'xxxxxxxxxxxxxxxxxxxxxx [... 33 characters cut ...]  no steps."
    """
    if len(message) <= limit:
        return message
    head, tail = limit - limit // 4, limit // 4
    cut_n = len(message) - head - tail
    return f"{message[:head]} [... {cut_n} characters cut ...] {message[-tail:]}"


def _version() -> str:
    from compactnn import __version__

    return f"compactnn {__version__}"


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into a closed pipe does not
    print an "Exception ignored" traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (a test's capture): nothing to flush
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one plain line (``warning: ...``), not a source-code excerpt."""
    print(f"warning: {message}", file=sys.stderr)


class _TorchaoEnumNotice(logging.Filter):
    """Drops torch's notice that torchao registers its Enum classes (``KernelPreference``,
    ``ScaleCalculationMode``) as pytree constants, a deprecation torchao has to act on: two
    ``W... torch/utils/_pytree.py`` lines on every command that imports transformers, which
    imports torchao when it is installed (``transformers.quantizers``). Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        torchao = getattr(cls, "__module__", "").startswith("torchao")
        return not (torchao and "register_constant() on Enum" in str(record.msg))


def quiet_torchao_notice() -> None:
    """Install :class:`_TorchaoEnumNotice` on torch's pytree logger (once)."""
    logger = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _TorchaoEnumNotice) for f in logger.filters):
        logger.addFilter(_TorchaoEnumNotice())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is: a ``KeyboardInterrupt``, so every cleanup that
    Ctrl-C runs (a training log removed or kept for a resume, a temporary folder) runs for
    it as well. Only SIGKILL cannot be caught."""


def _terminate(signum, frame) -> None:
    """The SIGTERM handler: raise :class:`Terminated` once; a second SIGTERM (during the
    cleanup) ends the process at once, as it would have without the handler."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the command runs, SIGTERM stops it as Ctrl-C does (:class:`Terminated`); the
    previous handler is restored after. Outside the main thread (no handler can be set
    there) nothing changes."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except (ValueError, OSError):  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigint_mask(how: int) -> None:
    """Block or unblock SIGINT for this thread (nothing where the system has no masks)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(how, {signal.SIGINT})


@contextlib.contextmanager
def sigint_held_across_exec():
    """Hold Ctrl-C while :func:`ensure_passive_policy` may re-execute the command: the
    blocked SIGINT stays pending through ``execv``, and the new process unblocks it in
    :func:`main` (:data:`SIGINT_HELD`), where it stops the command with ``interrupted``
    instead of a ``KeyboardInterrupt`` traceback from its start-up imports. Without a
    re-exec, the mask is restored here (a pending Ctrl-C raises at once)."""
    os.environ[SIGINT_HELD] = "1"
    _sigint_mask(signal.SIG_BLOCK)
    try:
        yield
    finally:
        os.environ.pop(SIGINT_HELD, None)
        _sigint_mask(signal.SIG_UNBLOCK)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error)."""
    previous = warnings.showwarning
    try:
        if os.environ.pop(SIGINT_HELD, None):  # re-executed: a Ctrl-C held since raises here
            _sigint_mask(signal.SIG_UNBLOCK)
        quiet_torchao_notice()
        parser = build_parser()
        args = parser.parse_args(argv)
        if argv is None and args.command in PASSIVE_COMMANDS:  # a real command line, no test
            with sigint_held_across_exec():
                ensure_passive_policy("compactnn.cli", sys.argv[1:], OPENMP_LOADED)
        if getattr(args, "no_progress", False):
            hide_hf_progress()
        warnings.showwarning = _show_warning
        with sigterm_as_interrupt():  # timeout, Slurm, systemd: cleaned up as for Ctrl-C
            import_plugins(getattr(args, "plugin", None) or ())  # before any recipe is read
            return int(args._run(args) or 0)
    except CompactnnError as exc:
        print(f"error: {bounded(with_hints(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `compactnn ... | head -1`: the reader left; nothing to say
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.filename is None or exc.errno not in USER_OS_ERRORS:
            raise  # not attributable to one of the user's paths: a bug, keep the traceback
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        close_progress_bars()  # else "interrupted" lands at the end of the bar's line
        if isinstance(exc, Terminated):
            print("terminated (SIGTERM)", file=sys.stderr)
            return EXIT_TERMINATED
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.showwarning = previous


def os_error_message(exc: OSError) -> str:
    """One line for a disk or permission error: the path, the reason, the fix.

    Example:
        >>> os_error_message(OSError(errno.ENOSPC, "No space left on device", "out/m"))
        "'out/m': No space left on device; free some disk space or choose another --out."
    """
    return f"{cut(exc.filename)!r}: {exc.strerror}; {USER_OS_ERRORS[exc.errno]}."


if __name__ == "__main__":
    sys.exit(main())
