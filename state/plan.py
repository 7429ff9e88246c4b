"""Decide, from a stat-only scan and the stored state, which sessions a run must read.

Nothing here opens a transcript: an unchanged `(size, mtime_ns)` is skipped outright. A file
whose stat changed but whose processor version and last read are current carries its stored
hash, so the worker can skip it after hashing (a `touch` must not trigger work).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from state.scan import FoundFile

ORDER = {"new": 0, "append": 1, "changed": 1, "version": 2, "retry": 3}


@dataclass(frozen=True, slots=True)
class StoredState:
    size_bytes: int | None
    mtime_ns: int | None
    file_hash: str | None
    processor_version: str | None
    status: str | None
    attempts: int
    last_attempt_at: datetime | None
    complete_offset: int | None = None
    complete_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    key: str
    path: str
    size: int
    mtime_ns: int
    reason: str  # new | changed | append | version | retry
    known_hash: str | None = None
    known_size: int | None = None
    # append: continue after `resume_offset` if the bytes before it still hash to
    # `resume_hash`, from the processor's stored `checkpoint` (loaded just before reading)
    resume_offset: int | None = None
    resume_hash: str | None = None
    checkpoint: bytes | None = None

    @property
    def username(self) -> str:
        return self.key.split("/", 1)[0]


@dataclass
class Plan:
    candidates: list[Candidate] = field(default_factory=list)
    scanned: int = 0
    unchanged: int = 0
    held: list[str] = field(default_factory=list)  # quarantined: left alone until reprocess
    missing: int = 0  # sessions known to the state whose file is gone


def plan(
    found: Iterable[FoundFile],
    states: dict[str, StoredState],
    version: str,
    *,
    append_safe: bool = False,
) -> Plan:
    """New sessions first, then changed ones, then version bumps, then retries of failures
    (oldest attempt first), so a cluster of failing sessions can never starve fresh work;
    within each kind the oldest file first.
    For an append-safe processor a file that grew since its last read is an `append`."""
    result = Plan()
    retries: list[tuple[float, Candidate]] = []
    for f in found:
        result.scanned += 1
        state = states.get(f.key)
        if state is None:
            result.candidates.append(Candidate(f.key, f.path, f.size, f.mtime_ns, "new"))
            continue
        if state.status == "quarantined":
            result.held.append(f.key)
            continue
        if state.status == "missing":  # back: unchanged if its content is what was read
            result.candidates.append(
                Candidate(
                    f.key,
                    f.path,
                    f.size,
                    f.mtime_ns,
                    "changed",
                    known_hash=state.file_hash,
                    known_size=state.size_bytes,
                )
            )
            continue
        if state.status == "failed":
            when = state.last_attempt_at.timestamp() if state.last_attempt_at else 0.0
            retries.append((when, Candidate(f.key, f.path, f.size, f.mtime_ns, "retry")))
            continue
        # NULL version: a row imported from the old system, accepted as current once its
        # content hash is confirmed (re-running an LLM over all history would cost a fortune).
        version_current = state.processor_version in (version, None)
        if not version_current:
            result.candidates.append(Candidate(f.key, f.path, f.size, f.mtime_ns, "version"))
        elif (state.size_bytes, state.mtime_ns) == (f.size, f.mtime_ns) and (
            state.processor_version is not None
        ):
            result.unchanged += 1
        elif (
            append_safe
            and state.complete_offset is not None
            and state.size_bytes is not None
            and f.size > state.size_bytes
        ):
            result.candidates.append(
                Candidate(
                    f.key,
                    f.path,
                    f.size,
                    f.mtime_ns,
                    "append",
                    resume_offset=state.complete_offset,
                    resume_hash=state.complete_hash,
                )
            )
        else:
            result.candidates.append(
                Candidate(
                    f.key,
                    f.path,
                    f.size,
                    f.mtime_ns,
                    "changed",
                    known_hash=state.file_hash,
                    known_size=state.size_bytes if state.processor_version else f.size,
                )
            )
    # Oldest first within each kind: sessions a capped run deferred go before newer ones.
    result.candidates.sort(key=lambda c: (ORDER[c.reason], c.mtime_ns))
    result.candidates.extend(c for _, c in sorted(retries, key=lambda item: item[0]))
    return result
