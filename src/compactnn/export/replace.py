"""Crash-safe writing of an artifact directory: at every instant one whole artifact loads.

The header ``compactnn.json`` lists the files it uses, each with its size and SHA-256, so
renaming a new header over the old one is the single commit point. A save:

1. removes strays of earlier killed saves (the staged names below, ``.cnn-<token>-link-*``
   and ``.compactnn.json.*.tmp``-style temporaries) that the live header does not list;
2. writes the new tensor and recipe files under fresh names ``.cnn-<token>-model.safetensors``
   and ``.cnn-<token>-recipe.yaml`` and fsyncs them (the old artifact is untouched);
3. renames a header that lists those names over ``compactnn.json`` (commit: the new
   artifact is live; before this instant the old one is);
4. hard-links each new file to its usual name (``model.safetensors``, ``recipe.yaml``), then
   renames a second header that lists the usual names over the first (same digest: file
   names are not part of it). If the file system has no hard links, the artifact stays
   valid under its fresh names;
5. deletes every file of ours that the live header does not list (the old tensors, a stale
   recipe, the fresh names).

A save killed at any point leaves the old artifact or the new one; its leftovers are removed
by the next save into the same directory. Files of other names in the directory are never
touched.

Saves into one directory run one at a time: all five steps hold the directory's lock
(:mod:`compactnn.export.folder_lock`), so a second save never deletes the first one's staged
files as strays, and the artifact left is exactly one save's. A save that may replace an
artifact waits for the lock and then replaces what the first one wrote (the last writer
wins); one that may not (``force=False``) fails at once while the lock is held, and after it
if an artifact appeared in the meantime.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compactnn.errors import ArtifactError, cut
from compactnn.export import folder_lock
from compactnn.export.fs import atomic_write_text, fsync_dir, read_regular, sha256_file, write_new
from compactnn.export.validate import FILE_ROLES, HEADER, MAX_HEADER_BYTES, parse_header

_USUAL = "|".join(re.escape(name) for name in FILE_ROLES.values())
# the names a save itself gives its files: staged ``.cnn-<16 hex>-[link-]<usual name>`` and
# atomic_write's temporary ``.<name>.<mkstemp suffix>.tmp``; a user's ``.cnn-notes.txt`` is not
_STRAY = re.compile(
    rf"^(\.cnn-[0-9a-f]{{16}}-(link-)?({_USUAL})|\.({re.escape(HEADER)}|{_USUAL})\.\w+\.tmp)$",
    re.ASCII,
)

# Test hook: called with the name of each step of a save (the kill test stops a save there).
STEP_HOOK: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name)


def is_stray(name: str) -> bool:
    """Whether ``name`` is a leftover of a killed save (removed by the next save)."""
    return bool(_STRAY.match(name)) or name == folder_lock.LOCK_NAME


def listed_files(root: Path) -> set[str]:
    """Names of the files the live header lists (empty when there is none or it is bad)."""
    try:
        header = parse_header(read_regular(root / HEADER, None, MAX_HEADER_BYTES), HEADER)
        return {f["name"] for f in header["files"].values() if isinstance(f["name"], str)}
    except (ArtifactError, KeyError, TypeError, AttributeError):
        return set()


def _remove(root: Path, keep: set[str], *, usual_names: bool) -> None:
    """Delete our strays (and, with ``usual_names``, unlisted usual names) not in ``keep``."""
    ours = set(FILE_ROLES.values()) if usual_names else set()
    for entry in os.scandir(root):
        name = entry.name
        if name in keep or not (_STRAY.match(name) or name in ours):
            continue
        if entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.unlink(root / name)
        except OSError:
            pass  # a leftover costs space, never correctness: it is not listed


def _dumps(header: dict[str, Any]) -> str:
    return json.dumps(header, indent=1, sort_keys=True, allow_nan=False)


def write_artifact(
    root: Path,
    writers: dict[str, Callable[[str], None]],
    make_header: Callable[[dict], dict],
    *,
    force: bool | None = None,
) -> dict[str, Any]:
    """Write the files of ``writers`` (role -> write(path)) and commit a header listing them.

    ``make_header(files)`` builds the full header (digest included) from the file list
    ``{role: {"name", "bytes", "sha256"}}``. Returns the header that is live at the end.
    With ``force`` false the directory must hold no artifact: another save running into it,
    or one that committed since the caller checked, is a
    :class:`~compactnn.export.folder_lock.FolderBusyError` (nothing is written); otherwise
    (true, or None) a running save is waited for, then replaced.
    """
    with folder_lock.locked(root, wait=force is not False):
        if force is False and os.path.lexists(root / HEADER):
            raise folder_lock.FolderBusyError(
                f"the folder {cut(str(root))!r} received an artifact from another compactnn "
                "process while this one ran: rerun with --force (force=True in Python) to "
                "replace it, or pick another output folder."
            )
        return _write_locked(root, writers, make_header)


def _write_locked(
    root: Path, writers: dict[str, Callable[[str], None]], make_header: Callable[[dict], dict]
) -> dict[str, Any]:
    _remove(root, listed_files(root), usual_names=False)
    _step("cleaned")
    token = secrets.token_hex(8)
    files: dict[str, dict[str, Any]] = {}
    try:
        for role, write in writers.items():
            name = f".cnn-{token}-{FILE_ROLES[role]}"
            files[role] = {"name": name}
            write_new(root / name, write)
            st = os.stat(root / name)
            files[role].update(bytes=st.st_size, sha256=sha256_file(root / name))
            _step(f"staged {role}")
        header = make_header(files)
        fsync_dir(root)
        atomic_write_text(root / HEADER, _dumps(header))  # the commit point
    except BaseException:
        for f in files.values():
            (root / f["name"]).unlink(missing_ok=True)
        raise
    _step("committed")
    fsync_dir(root)
    header = _usual_names(root, header, token)
    _remove(root, {f["name"] for f in header["files"].values()}, usual_names=True)
    fsync_dir(root)
    _step("done")
    return header


def _usual_names(root: Path, header: dict[str, Any], token: str) -> dict[str, Any]:
    """Step 4: the same files under their usual names; returns the header then live."""
    files = {}
    try:
        for role, f in header["files"].items():
            usual = FILE_ROLES[role]
            link = root / f".cnn-{token}-link-{usual}"
            os.link(root / f["name"], link)
            os.replace(link, root / usual)  # unlisted by the live header: safe to replace
            files[role] = {**f, "name": usual}
            _step(f"linked {role}")
        fsync_dir(root)
        renamed = {**header, "files": files}
        atomic_write_text(root / HEADER, _dumps(renamed))
    except OSError:
        return header  # valid as it is, under the fresh names
    _step("renamed")
    return renamed
