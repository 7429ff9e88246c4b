"""How far a long run has got: sessions and megabytes read, the rate, the time left.

The committer reports each group of outcomes as it arrives; a `Progress` turns that into a
line for people, at most every `every` seconds: a bar redrawn in place on a terminal, a plain
log line otherwise, and (in a flow run) a Prefect progress artifact updated from 0 to 100%.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from state.plan import Candidate
from state.store import Outcome

MB = 1 << 20


@dataclass(frozen=True)
class Snapshot:
    processor: str
    files_done: int
    files: int
    bytes_done: int
    bytes: int
    seconds: float

    @property
    def percent(self) -> float:
        if self.bytes:
            return min(100.0, 100.0 * self.bytes_done / self.bytes)
        return 100.0 * self.files_done / self.files if self.files else 100.0

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.bytes_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_left(self) -> float | None:
        if self.rate <= 0:
            return None
        return max(0.0, (self.bytes - self.bytes_done) / self.rate)

    def line(self) -> str:
        left = self.seconds_left
        eta = f"{_duration(left)} left" if left is not None and self.percent < 100 else "done"
        return (
            f"{self.processor}: {self.percent:5.1f}%  {self.files_done:,}/{self.files:,} "
            f"sessions, {self.bytes_done / MB:,.0f}/{self.bytes / MB:,.0f} MB, "
            f"{self.rate / MB:,.1f} MB/s, {eta}"
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


Sink = Callable[[Snapshot, bool], None]  # (snapshot, final)


class Progress:
    """Counts what a run has read (thread-safe) and hands snapshots to its sinks."""

    def __init__(
        self,
        processor: str,
        candidates: Sequence[Candidate],
        sinks: Sequence[Sink],
        every: float = 2.0,
    ) -> None:
        self.processor = processor
        self.sizes = {c.key: c.size for c in candidates}
        self.files, self.bytes = len(candidates), sum(self.sizes.values())
        self.files_done = self.bytes_done = 0
        self.partial: dict[str, int] = {}  # big files: bytes of their committed segments
        self.sinks, self.every = list(sinks), every
        self.started = time.monotonic()
        self.shown = self.started  # the first line after `every` seconds: short runs say nothing
        self.said = False
        self.lock = threading.Lock()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            self.processor,
            self.files_done,
            self.files,
            self.bytes_done,
            self.bytes,
            time.monotonic() - self.started,
        )

    def advance(self, outcomes: Sequence[Outcome]) -> None:
        with self.lock:
            for o in outcomes:
                size = self.sizes.get(o.key, 0)
                already = self.partial.pop(o.key, 0)
                if o.partial:
                    done = min(size, o.complete_offset or 0)
                    self.partial[o.key] = done
                    self.bytes_done += done - already
                else:
                    self.files_done += 1
                    self.bytes_done += size - already
            now = time.monotonic()
            if now - self.shown < self.every:
                return
            self.shown, self.said = now, True
            snap = self.snapshot()
        self._show(snap, final=False)

    def finish(self) -> None:
        if self.said:  # only a run that showed progress says it is done
            self._show(self.snapshot(), final=True)

    def _show(self, snap: Snapshot, final: bool) -> None:
        for sink in self.sinks:
            with contextlib.suppress(Exception):  # progress is a courtesy: never fails a run
                sink(snap, final)


def terminal_sink(stream: TextIO | None = None) -> Sink:
    """A bar redrawn in place on a terminal; a plain line each time otherwise."""
    out = stream or sys.stderr
    tty = out.isatty()

    def show(snap: Snapshot, final: bool) -> None:
        if tty:
            width = 24
            filled = round(width * snap.percent / 100)
            bar = "#" * filled + "-" * (width - filled)
            out.write(f"\r[{bar}] {snap.line()}\033[K" + ("\n" if final else ""))
        else:
            out.write(snap.line() + "\n")
        out.flush()

    return show
