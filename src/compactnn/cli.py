"""The ``compactnn`` command: argument parsing only; each subcommand lives in
:mod:`compactnn.commands` (a module with ``add_parser(subparsers)`` and ``run(args) -> int``).

Every :class:`~compactnn.errors.CompactnnError` is printed as ``error: <message>`` and exits
with status 2, without a traceback. So is an ``OSError`` that names its file and is about
the disk or permissions (full disk, file too large, no access, read-only file system, name
too long): the user can fix those. So is running out of memory (a ``MemoryError``, numpy's
included; torch's CPU allocator failing; an ENOMEM): ``error: out of memory (...)``, naming
the allocation that failed, and the fixes. A message is cut to about ``MAX_MESSAGE`` characters.
(The writers of :mod:`compactnn.export.fs` name the file of a failed write.) Any other
exception is a bug and keeps its traceback. Ctrl-C (SIGINT) and SIGTERM stop a command the
same way, its cleanup run (a training log removed, or kept where a checkpoint resumes it):
``interrupted`` and status 130, ``terminated (SIGTERM)`` and status 143. Under ``torchrun``
rank 0 alone prints the ``error:``, ``warning:`` and interrupt lines (every rank meets the
same); the other ranks exit with the same status, silently (a refusal met by one rank
alone is printed by it, ``rank N: error: ...``, after :data:`RANK_GRACE_S`), and still print
what may be their own: a traceback, an out-of-memory or a disk error.

OpenMP: every command that computes (``PASSIVE_COMMANDS``: all but ``recipes``) runs with
``OMP_WAIT_POLICY=PASSIVE`` and, while the load is below the CPU count, a bounded spin,
unless the user set a policy: spinning OpenMP threads inflated latencies 6-23x on a loaded
machine, and made ``compress --recipe w4a4-brecq`` of a small CNN take 120 s instead of 20 s
at load 6-7. OpenMP reads the policy once, when torch loads it; ``import compactnn`` and this
module load no torch (the package's names are imported on first use), so :func:`main` sets
the policy before the command's modules import torch. Only where a caller had loaded torch
already does the command re-execute itself once with the policy set
(:func:`compactnn.omp_policy.ensure_passive_policy`). A Ctrl-C while torch loads prints
``interrupted`` as anywhere else in a command.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from compactnn.cli_os_errors import USER_OS_ERRORS, os_error_message
from compactnn.cli_streams import raw_bytes, tolerant_streams
from compactnn.commands import COMMANDS
from compactnn.commands._path_args import check_path_args, dash_path_hint, path_labels
from compactnn.errors import CompactnnError, cut, first_line, is_out_of_memory
from compactnn.launch_env import env_rank
from compactnn.omp_policy import ensure_passive_policy, openmp_runtime_loaded
from compactnn.user_modules import user_folder_importable

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left
EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # 128 + SIGTERM (timeout, Slurm, systemd, kill)
# How long a rank other than 0 waits, after a refusal, for torchrun to stop it: rank 0
# meets the same refusal and prints it (:func:`said_by_rank0`).
RANK_GRACE_S = 5.0
# What to do when a command runs out of memory (a MemoryError, torch's CPU allocator failing).
MEMORY_FIXES = (
    "free memory (close other programs) or raise the process's limit (ulimit -v), use fewer "
    "threads (OMP_NUM_THREADS=1), pass a smaller --data or calibration set, or use a machine "
    "with more memory"
)
# The size torch's CPU allocator names when it fails.
_TRIED = re.compile(r"you tried to allocate (\d+) bytes")
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


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (its subparsers too) whose errors name the ``./`` form of a path
    that starts with ``-`` (read as an option: "the following arguments are required:
    MODEL" for ``compress -m.pt``)."""

    def parse_known_args(self, args=None, namespace=None):
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        super().error(message + dash_path_hint(getattr(self, "_words", ()), self))


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per module listed in ``COMMANDS``."""
    parser = _Parser(
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
        sub_parser.set_defaults(_run=module.run, _paths=path_labels(sub_parser))
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
            if is_out_of_memory(exc):  # not the plugin's fault: main says "out of memory"
                raise
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
    # the library's words for the command line's flag (a save that found another run's
    # artifact in its folder meanwhile: every command that writes one takes --force)
    return message.replace("pass force=True to replace it", "pass --force to replace it")


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
    """Warnings as one plain line (``warning: ...``), not a source-code excerpt; under
    ``torchrun`` on rank 0 alone (:func:`other_rank`)."""
    if not other_rank():
        print(raw_bytes(f"warning: {message}"), file=sys.stderr)


def other_rank() -> bool:
    """Whether this process is a rank other than 0 of a ``torchrun`` run (its ``RANK`` beside
    ``WORLD_SIZE``: :func:`~compactnn.launch_env.env_rank`): every rank meets the same
    warnings, refusals and interrupts, and rank 0 alone says them; the others exit with the
    same status, silently."""
    return env_rank() != 0


def said_by_rank0(line: str) -> None:
    """On a rank other than 0, the refusal ``line``: rank 0 meets the same and prints it, and
    ``torchrun`` stops this rank when rank 0 exits, so wait :data:`RANK_GRACE_S` (without
    it, this rank's exit could make torchrun stop rank 0 before it printed) and exit with
    the refusal's status when stopped; a rank still running then met it alone: it says so."""

    def stopped(signum, frame) -> None:
        raise SystemExit(EXIT_USER_ERROR)

    try:
        previous = signal.signal(signal.SIGTERM, stopped)
    except (ValueError, OSError):  # not the main thread
        previous = None
    try:
        time.sleep(RANK_GRACE_S)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"rank {os.environ.get('RANK')}: {line}", file=sys.stderr)


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


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand a command line names, read before the parser (whose modules import
    torch) is built: the first argument, the top-level parser having no option that takes a
    value (``--version``, ``--help``).

    Example:
        >>> command_of(["eval", "out/"]), command_of(["--version"]), command_of([])
        ('eval', None, None)
    """
    return argv[0] if argv and not argv[0].startswith("-") else None


def passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` for this command (module docstring): set here while no
    OpenMP runtime is loaded; else the command re-executes itself with it, Ctrl-C held
    across the exec (:func:`sigint_held_across_exec`)."""
    if not openmp_runtime_loaded():
        ensure_passive_policy("compactnn.cli", sys.argv[1:], openmp_loaded=False)
        return
    with sigint_held_across_exec():
        ensure_passive_policy("compactnn.cli", sys.argv[1:], openmp_loaded=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error)."""
    if argv is None:  # the real command line: its own streams (tests pass argv, capture them)
        with tolerant_streams():
            return _main(argv)
    return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    previous = warnings.showwarning
    try:
        if os.environ.pop(SIGINT_HELD, None):  # re-executed: a Ctrl-C held since raises here
            _sigint_mask(signal.SIG_UNBLOCK)
        if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
            print(_version())  # without the parser, whose modules load torch (2-3 s)
            return 0
        if argv is None and command_of(sys.argv[1:]) in PASSIVE_COMMANDS:  # no test's call
            passive_openmp()  # before the command's modules load torch
        quiet_torchao_notice()
        parser = build_parser()
        args = parser.parse_args(argv)
        from compactnn.core.progress import bar_options

        if bar_options(not getattr(args, "no_progress", False), sys.stderr)["disable"]:
            from compactnn.commands._common import hide_hf_progress

            hide_hf_progress()  # --no-progress, or no terminal (a log): no HF bars either
        warnings.showwarning = _show_warning
        check_path_args(args, args._paths)  # empty MODEL, link loops, a quoted ~: first
        with sigterm_as_interrupt():  # timeout, Slurm, systemd: cleaned up as for Ctrl-C
            import_plugins(getattr(args, "plugin", None) or ())  # before any recipe is read
            return int(args._run(args) or 0)
    except CompactnnError as exc:
        _close_progress_bars()  # else a refusal raised mid-loop lands on the bar's line
        line = raw_bytes(f"error: {bounded(with_hints(exc))}")
        if other_rank():  # under torchrun, rank 0 says it; this rank only if it met it alone
            said_by_rank0(line)
        else:
            print(line, file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `compactnn ... | head -1`: the reader left; nothing to say
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (MemoryError, RuntimeError, OSError) as exc:
        if is_out_of_memory(exc):  # numpy's, torch's CPU allocator's, an ENOMEM
            command = command_of(list(sys.argv[1:] if argv is None else argv))
            _close_progress_bars()
            print(f"error: {bounded(memory_message(exc, command))}", file=sys.stderr)
            return EXIT_USER_ERROR
        if not isinstance(exc, OSError) or exc.filename is None or exc.errno not in USER_OS_ERRORS:
            raise  # not memory, nor one of the user's paths: a bug, keep the traceback
        print(raw_bytes(f"error: {os_error_message(exc)}"), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        _close_progress_bars()
        terminated = isinstance(exc, Terminated)
        if not other_rank():  # torchrun stops every rank: rank 0 alone says it
            print("terminated (SIGTERM)" if terminated else "interrupted", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        warnings.showwarning = previous


def _close_progress_bars() -> None:
    """Close the progress bars a stopped step left open: else the last line printed lands at
    the end of the bar's line."""
    common = sys.modules.get("compactnn.commands._common")  # not while torch loads
    if common is not None:
        common.close_progress_bars()


def memory_message(exc: BaseException, command: str | None = None) -> str:
    """One line for running out of memory: what ran out (the allocation that failed, where
    torch or numpy say its size; the file being read), and the fixes.

    Example:
        >>> memory_message(MemoryError(), "compress")[:78]
        'out of memory: compactnn compress needed more memory than this process may use'
    """
    text = str(exc)
    if (tried := _TRIED.search(text)) is not None:
        detail = f"an allocation of {size_text(int(tried.group(1)))} failed"
    elif isinstance(exc, OSError) and exc.strerror:  # not "[Errno 12] ..."
        detail = exc.strerror if exc.filename is None else f"{cut(exc.filename)!r}: {exc.strerror}"
    else:
        detail = first_line(exc) if text.strip() else ""
    who = f"compactnn {command}" if command in COMMANDS else "the command"
    return (
        f"out of memory{f' ({detail})' if detail else ''}: {who} needed more memory than "
        f"this process may use; {MEMORY_FIXES}."
    )


def size_text(n: int) -> str:
    """A byte count for a message.

    Example:
        >>> size_text(9437184), size_text(512)
        ('9.0 MiB (9,437,184 bytes)', '512 bytes')
    """
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


if __name__ == "__main__":
    sys.exit(main())
