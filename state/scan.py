"""Find session transcripts under the data dir with a stat and nothing more.

Layout: `<data_dir>/<user>/<session>.jsonl`, older subagent files `<user>/agent-<id>.jsonl`
beside them, and current subagent transcripts `<user>/<session>/subagents/agent-<id>.jsonl`.
Keys are paths relative to the data dir in POSIX form. A symbolic link is followed only when
its target stays inside the data dir.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("session_pipeline.scan")


@dataclass(frozen=True, slots=True)
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


def _file_stat(entry: os.DirEntry[str], root_real: str) -> os.stat_result | None:
    if not entry.name.endswith(".jsonl") or not _utf8(entry.name):
        return None
    try:
        if entry.is_symlink() and not _inside(root_real, entry.path):
            return None
        st = entry.stat()
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def scan(data_dir: str | os.PathLike[str]) -> Iterator[FoundFile]:
    """Yield every session file. A missing data dir yields nothing (all-zero figures)."""
    root = os.fspath(data_dir)
    if not os.path.isdir(root):
        return
    root_real = os.path.realpath(root)
    for user in _entries(root):
        if not _dir_ok(user, root_real):
            continue
        for entry in _entries(user.path):
            st = _file_stat(entry, root_real)
            if st is not None:
                yield FoundFile(f"{user.name}/{entry.name}", entry.path, st.st_size, st.st_mtime_ns)
            elif _dir_ok(entry, root_real):
                subagents = os.path.join(entry.path, "subagents")
                if os.path.islink(subagents) and not _inside(root_real, subagents):
                    continue
                for sub in _entries(subagents):
                    sub_st = _file_stat(sub, root_real)
                    if sub_st is not None:
                        yield FoundFile(
                            f"{user.name}/{entry.name}/subagents/{sub.name}",
                            sub.path,
                            sub_st.st_size,
                            sub_st.st_mtime_ns,
                        )
