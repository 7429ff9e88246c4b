"""Find session transcripts under the data dir with a stat and nothing more.

Layout: `<data_dir>/<user>/<session>.jsonl`, older subagent files `<user>/agent-<id>.jsonl`
beside them, current subagent transcripts `<user>/<session>/subagents/agent-<id>.jsonl`, and
every `.jsonl` deeper below `subagents/` (workflow subagents are written to
`subagents/workflows/<workflow-id>/agent-<id>.jsonl`), at most SUBAGENT_DEPTH folders down.
Keys are paths relative to the data dir in POSIX form. A symbolic link is followed only when
its target stays inside the data dir.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from stat import S_ISREG

log = logging.getLogger("session_pipeline.scan")

# Folders below `<session>/subagents/` that are searched for transcripts. Real layouts use one
# (`workflows/<id>/`, two levels); the bound keeps a link cycle inside the data dir finite.
SUBAGENT_DEPTH = 4


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, and scans make 100k of them
class FoundFile:
    key: str
    path: str
    size: int
    mtime_ns: int

    @property
    def username(self) -> str:
        return self.key.split("/", 1)[0]


def _utf8(name: str) -> bool:
    """Keys are stored as text: a name that is not valid UTF-8 (it arrives with surrogate
    escapes) cannot be a key, so such an entry is skipped rather than failing every run."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        log.warning("skipping %r: its name is not valid UTF-8", name)
        return False
    return True


def _inside(root_real: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def _entries(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _dir_ok(entry: os.DirEntry[str], root_real: str) -> bool:
    if not _utf8(entry.name):
        return False
    try:
        if entry.is_symlink():
            return entry.is_dir() and _inside(root_real, entry.path)
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def scan(data_dir: str | os.PathLike[str]) -> list[FoundFile]:
    """Every session file. A missing data dir has none (all-zero figures)."""
    return scan_changed(data_dir, frozenset())[0]


def scan_changed(
    data_dir: str | os.PathLike[str], known: AbstractSet[tuple[str, int, int]]
) -> tuple[list[FoundFile], int]:
    """The session files whose `(key, size, mtime_ns)` is not in `known`, and how many files
    there are in all. Comparing while walking spares building an object for each of the
    (usually) nearly all files that did not change."""
    root = os.fspath(data_dir)
    changed: list[FoundFile] = []
    count = 0
    if not os.path.isdir(root):
        return changed, count
    root_real = os.path.realpath(root)
    for user in _entries(root):
        if _dir_ok(user, root_real):
            count += _collect(user.path, f"{user.name}/", root_real, known, changed, depth=None)
    return changed, count


def _collect(
    path: str,
    prefix: str,
    root_real: str,
    known: AbstractSet[tuple[str, int, int]],
    changed: list[FoundFile],
    *,
    depth: int | None,
) -> int:
    """Count the regular `.jsonl` files in `path` (links only to inside the data dir), adding
    to `changed` those not in `known`. In a user folder (`depth` None) each sub-folder is a
    session whose `subagents/` is searched; inside `subagents/` (`depth` the folders already
    descended) every sub-folder is, down to SUBAGENT_DEPTH. This loop runs for every file of
    every scan (figure 1 in docs/benchmarks.md), so the per-file checks are inline and
    cheapest first, and no generator stands between a directory entry and its comparison."""
    count = 0
    for entry in _entries(path):
        name = entry.name
        if name.endswith(".jsonl") and (name.isascii() or _utf8(name)):
            try:
                if entry.is_symlink() and not _inside(root_real, entry.path):
                    continue
                st = entry.stat()
            except OSError:
                continue
            if S_ISREG(st.st_mode):
                count += 1
                key, size, mtime_ns = prefix + name, st.st_size, st.st_mtime_ns
                if (key, size, mtime_ns) not in known:
                    changed.append(FoundFile(key, entry.path, size, mtime_ns))
                continue
        if depth is not None and depth >= SUBAGENT_DEPTH:
            continue
        if not _dir_ok(entry, root_real):
            continue
        if depth is None:
            below = os.path.join(entry.path, "subagents")
            if os.path.islink(below) and not _inside(root_real, below):
                continue
            count += _collect(
                below, f"{prefix}{name}/subagents/", root_real, known, changed, depth=0
            )
        else:
            count += _collect(
                entry.path, f"{prefix}{name}/", root_real, known, changed, depth=depth + 1
            )
    return count
