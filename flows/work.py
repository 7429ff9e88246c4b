"""Reading sessions: the pure half of a run, safe in any thread or process.

A worker opens each candidate once, takes its size and mtime before reading, and either
confirms by hash that the content is unchanged or hands it to the processor while hashing the
bytes as they stream past. Whatever a processor does (raise, return the wrong type, return
rows that do not fit its tables) fails that one session only, with a reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, cast

import orjson

from processors.base import (
    AppendSafe,
    ColumnRows,
    Processor,
    ProcessResult,
    Table,
    WholeReadNeeded,
    is_append_safe,
)
from processors.session import Session, SessionIdentity, hash_into, hash_prefix
from state.plan import Candidate
from state.store import Columns, Outcome

log = logging.getLogger("session_pipeline.work")

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "VARCHAR": (str,),
    "TEXT": (str,),
    "BIGINT": (int,),
    "INTEGER": (int,),
    "DOUBLE": (float, int),
    "BOOLEAN": (bool,),
    "TIMESTAMPTZ": (str, datetime),
    "TIMESTAMP": (str, datetime),
    "JSON": (str,),
}


# Checkpoints above this size are stored zlib-compressed: DuckDB needs about six times a
# value's size in memory to write it, and a 500 MB session's usage checkpoint is ~28 MB of JSON
# (~10 MB compressed). Below it the ~25 ms per MB of compressing costs more than it saves.
COMPRESS_CHECKPOINT_ABOVE = 4 << 20
_ZLIB = b"x"  # the first byte of a zlib stream; no JSON text starts with it


def pack_checkpoint(value: Any) -> bytes:
    """A processor's checkpoint as stored: JSON, compressed when large."""
    data = orjson.dumps(value)
    return zlib.compress(data, 1) if len(data) > COMPRESS_CHECKPOINT_ABOVE else data


def unpack_checkpoint(data: bytes) -> Any:
    return orjson.loads(zlib.decompress(data) if data[:1] == _ZLIB else data)


class RowError(ValueError):
    """A processor returned rows that do not fit its declared tables."""


def _coerce(value: Any, sql_type: str, table: str, column: str) -> Any:
    if value is None:
        return None
    base = sql_type.upper()
    if base == "JSON" and not isinstance(value, str):
        return orjson.dumps(value).decode()
    if base.endswith("[]"):
        if not isinstance(value, list | tuple):
            raise RowError(f"{table}.{column} expects a list, got {type(value).__name__}")
        return list(value)
    expected = _PY_TYPES.get(base)
    if expected is None:
        return value
    if base in ("BIGINT", "INTEGER") and isinstance(value, bool):
        return int(value)
    if not isinstance(value, expected):
        raise RowError(f"{table}.{column} expects {base}, got {type(value).__name__}")
    return value


_NONE = type(None)


@lru_cache(maxsize=256)
def _checks(table: Table) -> tuple[tuple[str, str, frozenset[type] | None], ...]:
    """Per column of a table: its name, type, and the exact Python types it takes as they
    are (None: any, or only after coercion). Worked out once per table, not once per row
    set: a run of small sessions validates three tables per session."""
    return tuple(
        (name, sql_type, _exact_types(sql_type))
        for name, sql_type in zip(table.column_names, table.value_types, strict=True)
    )


def _exact_types(sql_type: str) -> frozenset[type] | None:
    expected = _PY_TYPES.get(sql_type.upper())
    return None if expected is None else frozenset({*expected, _NONE})


def _column(values: list[Any], sql_type: str, table: str, column: str) -> list[Any]:
    """One column's values coerced to its type, or RowError."""
    return [_coerce(value, sql_type, table, column) for value in values]


def to_columns(tables: Sequence[Table], result: ProcessResult) -> dict[str, Columns]:
    """Validate a result against the declared tables and turn it column-wise, the shape
    DuckDB inserts fastest (one `UNNEST` per column instead of a statement per row).

    The common case, every value of a column already of an exact Python type the column
    takes (a bool is not taken for an int here), is checked with `map` and `set` at C speed,
    in one loop per table: a run of small sessions validates three tables per session."""
    by_name = {t.name: t for t in tables}
    unknown = set(result.rows) - set(by_name)
    if unknown:
        raise RowError(f"rows for undeclared table(s): {', '.join(sorted(unknown))}")
    out: dict[str, Columns] = {}
    for name, rows in result.rows.items():
        table = by_name[name]
        allowed = frozenset(table.column_names)
        given = rows.columns if isinstance(rows, ColumnRows) else None
        for keys in [given.keys()] if given is not None else (row.keys() for row in rows):
            if not keys <= allowed:
                extra = sorted(set(keys) - allowed)
                raise RowError(f"{name} has no column(s) {', '.join(extra)}")
        columns: Columns = {}
        for column, sql_type, exact in _checks(table):
            if given is None:
                values = [row.get(column) for row in rows]
            else:
                values = given[column] if column in given else [None] * len(rows)
            if exact is None or not set(map(type, values)) <= exact:
                values = _column(values, sql_type, name, column)
            columns[column] = values
        out[name] = columns
    return out


def describe(error: BaseException) -> str:
    """One line for the state table and the logs: the type, the message, and where."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    where = ""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" (at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
    return f"{type(error).__name__}: {message}{where}"[:2000]


def _resume(f: IO[bytes], size: int, candidate: Candidate) -> Any | None:
    """The hasher over the bytes already read, if the file only grew since; else None and
    the file is back at its start for a whole read."""
    offset = candidate.resume_offset
    if offset is None or candidate.checkpoint is None or offset > size:
        return None
    hasher = hashlib.sha256()
    hash_into(f, offset, hasher)
    if hasher.hexdigest() == candidate.resume_hash:
        return hasher
    f.seek(0)
    return None


class UnsafeFileError(OSError):
    """Between scan and read the path became something that must not be read."""


def _open_regular(candidate: Candidate) -> IO[bytes]:
    """Open what the scan found, if it still is a regular file inside the data dir: a path
    swapped for a link that leaves the data dir is not followed, and a FIFO swapped in is
    refused instead of blocking the run (it is opened non-blocking, then checked)."""
    root = candidate.path[: len(candidate.path) - len(candidate.key)]
    root_real = os.path.realpath(root).rstrip(os.sep) + os.sep
    if not os.path.realpath(candidate.path).startswith(root_real):
        raise UnsafeFileError(f"{candidate.key} now points outside the data dir")
    fd = os.open(candidate.path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{candidate.key} is no longer a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


# An append-safe processor reads a big file in segments of about this size, each committed (rows,
# checkpoint and a state row saying how far it got) before the next is read: memory stays
# bounded whatever the file's size, and a run killed half way continues where it stopped.
SEGMENT_BYTES = 32 << 20

Emit = Callable[[Outcome], None]


def confirm_unchanged(candidate: Candidate) -> Outcome | None:
    """The `unchanged` outcome of a candidate whose content is, by hash, what was last read;
    None when it must be read (or cannot be opened: its read will say why)."""
    if candidate.known_hash is None:
        return None
    read_at = datetime.now(UTC)
    try:
        with _open_regular(candidate) as f:
            st = os.fstat(f.fileno())
            if candidate.known_size != st.st_size:
                return None
            digest = hash_prefix(f, st.st_size)
    except Exception:
        return None
    if digest != candidate.known_hash:
        return None
    return Outcome(candidate.key, "unchanged", read_at, st.st_size, st.st_mtime_ns, digest)


def process_candidate(
    processor: Processor,
    candidate: Candidate,
    emit: Emit | None = None,
    deadline: float | None = None,
) -> Outcome:
    """Read one session. With `emit`, an append-safe processor's read of a big file is cut into
    segments: each but the last is handed to `emit` (which commits it) as a partial outcome.
    Past `deadline` (epoch seconds) the segment just read is returned, partial: the next run
    continues from it."""
    read_at = datetime.now(UTC)
    try:
        with _open_regular(candidate) as f:
            st = os.fstat(f.fileno())
            size, mtime_ns = st.st_size, st.st_mtime_ns
            if candidate.known_hash is not None and candidate.known_size == size:
                digest = hash_prefix(f, size)
                if digest == candidate.known_hash:
                    return Outcome(candidate.key, "unchanged", read_at, size, mtime_ns, digest)
                f.seek(0)
            if is_append_safe(processor):
                reader = cast(AppendSafe, processor)
                return _read_append_safe(
                    reader, candidate, f, size, mtime_ns, read_at, emit, deadline
                )
            session = _session(candidate, f, size)
            result = processor.process(session)
            digest = session.finish()
        if not isinstance(result, ProcessResult):
            # The old contract: a return value of the wrong type counts as 0 items and the
            # session is still marked processed.
            log.warning(
                "%s: processor %s returned %s, not a ProcessResult; recorded as 0 items",
                candidate.key,
                processor.name,
                type(result).__name__,
            )
            result = ProcessResult()
        columns = to_columns(processor.tables, result)
    except Exception as error:
        reason = describe(error)
        log.debug("session %s failed in processor %s: %s", candidate.key, processor.name, reason)
        return Outcome(candidate.key, "failed", read_at, error=reason)
    return Outcome(
        candidate.key,
        "processed",
        read_at,
        size,
        mtime_ns,
        digest,
        columns=columns,
        items=int(result.items),
        malformed_lines=session.malformed_lines,
    )


def _session(
    candidate: Candidate, f: IO[bytes], end: int, start: int = 0, hasher: Any = None
) -> Session:
    return Session(
        identity=SessionIdentity.from_key(candidate.key),
        path=Path(candidate.path),
        size=end,
        _file=f,
        start=start,
        _hasher=hasher if hasher is not None else hashlib.sha256(),
    )


def _read_append_safe(
    processor: AppendSafe,
    candidate: Candidate,
    f: IO[bytes],
    size: int,
    mtime_ns: int,
    read_at: datetime,
    emit: Emit | None,
    deadline: float | None,
) -> Outcome:
    """An append-safe processor's read of one file: from the stored checkpoint when the file
    only grew since, else from the start; in segments when the caller commits them (`emit`)."""
    hasher = _resume(f, size, candidate)
    resumed = hasher is not None
    start = (candidate.resume_offset or 0) if resumed else 0
    checkpoint = unpack_checkpoint(candidate.checkpoint) if resumed else None
    segment = SEGMENT_BYTES if emit is not None else size
    restarted = False
    while True:
        end = min(size, start + segment)
        f.seek(start)
        session = _session(candidate, f, end, start, hasher)
        try:
            increment = processor.process_increment(session, checkpoint)
        except WholeReadNeeded as error:
            if checkpoint is None:
                raise
            start, hasher, resumed = 0, None, False
            if error.restart is not None and not restarted:
                # Read it whole from the state the processor names (one that keeps what these
                # lines need all along): in segments, each committed, memory bounded.
                log.debug(
                    "%s: %s reads the file whole from a restart", candidate.key, processor.name
                )
                checkpoint, restarted = error.restart, True
                continue
            # The checkpoint keeps too little for these lines: read the file whole, in one
            # read (in segments the same entry could be dropped again).
            log.debug("%s: %s reads the file whole", candidate.key, processor.name)
            checkpoint, segment = None, size
            continue
        digest = session.finish()
        if end < size and session.complete_offset == start:
            segment *= 2  # not one whole line in the segment: a line longer than it
            continue
        final = end == size
        outcome = Outcome(
            candidate.key,
            "processed",
            read_at,
            size if final else session.complete_offset,
            mtime_ns,
            digest if final else session.complete_hash,
            columns=to_columns(processor.tables, ProcessResult(increment.rows, increment.items)),
            increment=resumed,
            checkpoint=pack_checkpoint(increment.checkpoint),
            complete_offset=session.complete_offset,
            complete_hash=session.complete_hash,
            items=int(increment.items),
            malformed_lines=session.malformed_lines,
            partial=not final,
        )
        if final or emit is None or (deadline is not None and time.time() >= deadline):
            return outcome
        checkpoint = increment.checkpoint
        del increment  # the segment's rows: freed once committed
        emit(outcome)
        del outcome
        start, hasher, resumed = session.complete_offset, session.complete_hasher(), True


class ReadAllowance:
    """How many more sessions a run may read (`SESSION_PROCESSOR_MAX_PER_RUN`), shared by the
    threads reading its batches. A candidate whose content turns out unchanged gives its
    place back: the cap counts sessions read, not candidates looked at (counting those
    starved new sessions behind touched ones in the old system)."""

    def __init__(self, sessions: int) -> None:
        self.left = sessions
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.left += 1


def process_batch(
    processor: Processor,
    batch: Sequence[Candidate],
    deadline: float | None = None,
    *,
    at_least_one: bool = False,
    emit: Emit | None = None,
    allowance: ReadAllowance | None = None,
    stop: threading.Event | None = None,
) -> list[Outcome]:
    """Process a batch in order. Past the run's deadline (epoch seconds) the rest of the
    batch is left for the next run rather than holding the processor hostage; with
    `at_least_one` the first session is read regardless, so every run makes progress. Once an
    `allowance` is used up, sessions are no longer read, but touched ones are still settled
    when their hash shows them unchanged; the rest wait for the next run. Once `stop` is set
    (the run is being stopped) no further session is started."""
    outcomes: list[Outcome] = []
    for candidate in batch:
        if deadline is not None and time.time() >= deadline and (outcomes or not at_least_one):
            break
        if stop is not None and stop.is_set():
            break
        if allowance is not None and not allowance.take():
            settled = confirm_unchanged(candidate)
            if settled is not None:
                outcomes.append(settled)
            continue
        outcome = process_candidate(processor, candidate, emit, deadline)
        if allowance is not None and outcome.status == "unchanged":
            allowance.give_back()
        outcomes.append(outcome)
    return outcomes
