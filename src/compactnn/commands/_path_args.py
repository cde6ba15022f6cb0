"""The paths of a command line: refused before any work when they cannot mean what the user
meant, and printed so that a command shown to the user can be pasted back.

Read before a command runs (no torch here): an empty MODEL (``Path("")`` would be the current
folder), a symbolic link loop (``os.stat`` raises ELOOP: "does not exist" or "is not a
directory" would be wrong), and a ``~`` the shell did not expand (quoted, or after ``=``:
``--out "~/x"`` would make a folder named ``~``). A path that starts with ``-`` reads as an
option: it is printed as ``./-out``, and an argparse error names the ``./`` form.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
from collections.abc import Iterable, Sequence

from compactnn.errors import CompactnnError, cut

# The destinations (argparse ``dest``) that name files or folders, in every command.
PATH_DESTS = frozenset(
    {
        "model",
        "target",
        "artifact",
        "artifacts",
        "out",
        "weights",
        "data",
        "eval_data",
        "recipe",
        "onnx",
        "save",
        "json",
        "log",
        "checkpoint_dir",
        "tokenizer",
    }
)
_MODEL_FORMS = (
    "a reference model name, a Hugging Face model folder, a .pt2 file, or "
    "package.module:factory with --weights FILE"
)
# What an empty positional argument should have been, by its metavar.
EMPTY_FIXES = {
    "MODEL": f"pass {_MODEL_FORMS}",
    "MODEL_OR_ARTIFACT": f"pass an artifact folder (compactnn compress --out) or {_MODEL_FORMS}",
    "ARTIFACT": "pass an artifact folder (what compactnn compress --out wrote)",
    "ART": "pass artifact folders (what compactnn compress --out wrote)",
}
_NUMBER = re.compile(r"-\d*\.?\d+(e[-+]?\d+)?$", re.IGNORECASE)


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a command line takes it back: ``./`` before a name that starts with ``-``
    (else read as an option).

    Example:
        >>> shown_path("-out"), shown_path("out/-x"), shown_path("./-m.pt")
        ('./-out', 'out/-x', './-m.pt')
    """
    text = os.fspath(path)
    return f"./{text}" if text.startswith("-") else text


def path_labels(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``dest -> label`` of the path arguments of a (sub)command's parser: the metavar of a
    positional (``MODEL``), the long option string of an option (``--out``)."""
    labels = {}
    for action in parser._actions:
        if action.dest not in PATH_DESTS:
            continue
        if action.option_strings:
            labels[action.dest] = max(action.option_strings, key=len)
        else:
            labels[action.dest] = str(action.metavar or action.dest.upper())
    return labels


def check_path_args(args: argparse.Namespace, labels: dict[str, str]) -> None:
    """Refuse an empty MODEL (or ARTIFACT), a symbolic link loop and an unexpanded ``~`` among
    the path arguments ``labels`` names (:func:`path_labels`), before any work.

    Example:
        >>> ns = argparse.Namespace(model="")
        >>> check_path_args(ns, {"model": "MODEL"})
        Traceback (most recent call last):
        ...
        compactnn.errors.CompactnnError: MODEL '' is empty: pass a reference model name, a \
Hugging Face model folder, a .pt2 file, or package.module:factory with --weights FILE.
    """
    for dest, label in labels.items():
        for value in _values(getattr(args, dest, None)):
            if not value.strip() and label in EMPTY_FIXES:
                raise CompactnnError(f"{label} {value!r} is empty: {EMPTY_FIXES[label]}.")
            if value.strip():
                check_link_loop(value, label)
                check_tilde(value, label)


def _values(value: object) -> Iterable[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []


def check_link_loop(value: str, label: str) -> None:
    """A CompactnnError when ``value`` is (or runs through) a symbolic link loop."""
    try:
        os.stat(value)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            return  # missing, or no access: the command says so in its own words
        where = f" ({value} -> {os.readlink(value)})" if os.path.islink(value) else ""
        raise CompactnnError(
            f"{label} {cut(value)!r} is a symbolic link loop{where}: point the link at a real "
            "file or folder, or give another path."
        ) from exc
    except ValueError:  # a NUL byte: the command names it
        return


def check_tilde(value: str, label: str) -> None:
    """A CompactnnError when ``value`` starts with a ``~`` the shell left unexpanded (it was
    quoted, or followed ``=``), unless a file or folder of that literal name exists."""
    if not value.startswith("~") or os.path.lexists(value):
        return
    expanded = os.path.expanduser(value)
    if expanded == value:  # ~name of no such user: a plain (missing) path
        return
    how = f"{label} {value}" if label.startswith("-") else value
    raise CompactnnError(
        f"{label} {cut(value)!r} starts with '~', which the shell expands only at the start "
        f"of an unquoted word: write {how} without quotes (and without '='), or give "
        f"{cut(expanded)!r}."
    )


def _reads_as_option(word: str, options: dict) -> bool:
    """Whether argparse took ``word`` for an option none of the parser's matches."""
    if not word.startswith("-") or word == "-" or word == "--" or _NUMBER.match(word):
        return False
    if word.startswith("--"):  # not an abbreviation of a long option either
        return not any(o.startswith(word.split("=")[0]) for o in options)
    return word[:2] not in options  # -rw8, -d=x: a short option with its value


def _path_like(word: str) -> bool:
    """A file or folder that exists, or a word with a ``.`` or ``/`` (``-m.pt``, ``-x/y``),
    not a mistyped option (``-z``, ``--frobnicate``)."""
    return os.path.lexists(word) or "." in word or "/" in word


def dash_path_hint(argv: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """The words to add to an argparse error when the command line holds a path that starts
    with ``-`` (read as an unknown option): write it as ``./-m.pt``. Empty when none does.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--out")
        >>> dash_path_hint(["-m.pt", "--out", "x"], p)
        " (a path that starts with '-' reads as an option: write ./-m.pt)"
    """
    options = parser._option_string_actions
    found = [word for word in argv if _reads_as_option(word, options) and _path_like(word)]
    if not found:
        return ""
    shown = ", ".join(f"./{word}" for word in dict.fromkeys(found))
    return f" (a path that starts with '-' reads as an option: write {shown})"


def shell_join(words: Sequence[str]) -> str:
    """``shlex.join(words)``, except that a word holding undecodable bytes of a path (the
    ``\\udcXX`` that ``surrogateescape`` gives them) is written in the shell's ``$'...'``
    quoting with ``\\xNN`` escapes: a terminal shows such a byte as a replacement character,
    so printed raw it could not be copied back into a command.

    Example:
        >>> shell_join(["compactnn", "eval", "out dir", "m\\udcff'"])
        "compactnn eval 'out dir' $'m\\\\xff\\\\''"
    """
    return " ".join(_dollar_quote(w) if _SURROGATE.search(w) else shlex.quote(w) for w in words)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _dollar_quote(word: str) -> str:
    """``word`` as bash/zsh/POSIX-2024 ``$'...'``: undecodable bytes and non-printable or
    non-ASCII characters as ``\\xNN`` of their bytes, ``'`` and ``\\`` escaped."""
    out = []
    for ch in word:
        if ch in "'\\":
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            raw = ch.encode("utf-8", "surrogateescape")
            out.append("".join(f"\\x{b:02x}" for b in raw))
    return "$'" + "".join(out) + "'"
