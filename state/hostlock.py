"""One run per processor on this host, however it was started.

A run takes an exclusive `flock` on `<state file>.<processor>.lock` for as long as it works,
whether it runs in the command's own process or as a Prefect flow run (scheduled, webhook,
or `run` against a server); Prefect's global concurrency limit does the same across hosts.
The kernel drops the lock with the process, so a killed run never leaves it held.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from state.db import StateError


class ProcessorBusyError(StateError):
    """Another run of the processor holds its lock; the message is one line."""


def lock_path(db: Path, processor_name: str) -> Path:
    return db.with_name(f"{db.name}.{processor_name}.lock")


class HostLock:
    """The processor's lock on this host (not re-entrant: a second take in the same
    process is refused like any other)."""

    def __init__(self, db: Path, processor_name: str) -> None:
        self.path = lock_path(db, processor_name)
        self.processor_name = processor_name
        self._fd: int | None = None

    def acquire(self) -> HostLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ProcessorBusyError(
                f"Processor '{self.processor_name}' is already running (pid {holder} on this "
                "host holds its lock)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go (safe to call twice). The file stays: removing it would race a newcomer."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> HostLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
