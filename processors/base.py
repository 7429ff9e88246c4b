"""The processor contract.

A processor is a plain object that turns one session transcript into rows. It never opens
the database: the pipeline owns storage, so processors are pure, trivially testable, can run
in threads or processes, and never fight over the DuckDB write lock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

from processors.session import Session

Row = Mapping[str, Any]
_CONSTRAINT = re.compile(
    r"\s+(?:NOT\s|NULL\b|DEFAULT\b|PRIMARY\b|UNIQUE\b|CHECK\b|REFERENCES\b)", re.I
)


@dataclass(frozen=True)
class Table:
    """An output table. Every output table has a `session_file` column: the pipeline
    replaces a session's rows by deleting on it."""

    name: str
    columns: tuple[tuple[str, str], ...]
    # The columns that identify a row within its session file. Needed by append-safe
    # processors: an increment's rows replace the rows with the same key.
    key: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if "session_file" not in self.column_names:
            raise ValueError(f"output table {self.name!r} needs a session_file column")
        unknown = set(self.key) - set(self.column_names)
        if unknown:
            raise ValueError(f"key of {self.name!r} names unknown columns {sorted(unknown)}")

    @cached_property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @cached_property
    def value_types(self) -> tuple[str, ...]:
        """Each column's type without its constraints (`VARCHAR NOT NULL` -> `VARCHAR`)."""
        return tuple(
            _CONSTRAINT.split(sql_type, maxsplit=1)[0].strip() for _, sql_type in self.columns
        )

    @property
    def ddl(self) -> str:
        cols = ",\n    ".join(f"{name} {sql_type}" for name, sql_type in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n    {cols}\n)"


class ColumnRows(Sequence[Row]):
    """Rows held column-wise: `{column: [value, …]}`, every list as long as the others.

    It reads as a list of row dicts (each made when asked for), and the pipeline takes the
    columns as they are: a processor that returns many rows this way never builds a dict per
    row (for a 500 MB session, 189k dicts were ~140 MB).
    """

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths: {sorted(lengths)}")
        self.columns = columns
        self._length = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("row index out of range")
        return {name: values[index] for name, values in self.columns.items()}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"ColumnRows({self._length} rows: {', '.join(self.columns)})"


@dataclass
class ProcessResult:
    """What `process` returns: rows per output table (dicts keyed by column name, missing
    columns are NULL, or a `ColumnRows`) and the number of items extracted, reported in run
    figures."""

    rows: dict[str, Sequence[Row]] = field(default_factory=dict)
    items: int = 0


@dataclass
class Increment:
    """What an append-safe processor returns for the lines it was handed.

    `rows`: every row that is new or changed by these lines, per table (rows are replaced by
    their table's `key`); on a first read (no checkpoint) that is all of the session's rows.
    `items`: the session's items so far. `checkpoint`: any JSON-serialisable value; it is
    stored with the rows in the same transaction and handed back with the next lines, so
    state spanning the boundary (a streamed response split across it) is counted once.
    """

    rows: dict[str, Sequence[Row]] = field(default_factory=dict)
    items: int = 0
    checkpoint: Any = None


class WholeReadNeeded(Exception):
    """Raised by an append-safe processor when the new lines need more than its checkpoint
    keeps (a checkpoint may keep only recent state, so it does not grow with the file). The
    pipeline then reads the file whole.

    `restart`, when given, is a checkpoint to read the file whole from instead of None (the
    empty state, naming what to keep all along, e.g. the entries these lines needed): the
    pipeline can then read it in segments, each committed, like any big read. Should that read
    raise WholeReadNeeded again, the file is read whole in one read, from None.
    """

    def __init__(self, message: str = "", restart: Any = None) -> None:
        super().__init__(message)
        self.restart = restart


@runtime_checkable
class Processor(Protocol):
    """What the pipeline needs from a processor.

    `version` is part of every state row: changing it reprocesses every session for this
    processor alone. `cadence_seconds` is the default interval between scheduled runs.
    `views` are `CREATE OR REPLACE VIEW` statements run after the tables exist. Optionally,
    `read_threads` (default 1) is how many batches a flow run reads at once: more only helps
    a processor that mostly waits (on an LLM); Python work just contends for the GIL.
    """

    name: str
    version: str
    cadence_seconds: int
    tables: Sequence[Table]
    views: Sequence[str]

    def process(self, session: Session) -> ProcessResult: ...


@runtime_checkable
class AppendSafe(Protocol):
    """A processor that can continue where it stopped (Claude Code only appends).

    `process_increment(session, None)` reads a session whole; `process_increment(session,
    checkpoint)` gets only the lines after the last read, with the checkpoint that read
    returned. The pipeline guarantees the bytes before them are unchanged (else it reads the
    file whole), and tests that increments at any split give a full read's rows. It may raise
    WholeReadNeeded from an increment (never from a whole read): the file is then read whole.
    """

    append_safe: bool

    def process_increment(self, session: Session, checkpoint: Any | None) -> Increment: ...


def is_append_safe(processor: object) -> bool:
    return bool(getattr(processor, "append_safe", False)) and callable(
        getattr(processor, "process_increment", None)
    )


def unavailable_reason(processor: object) -> str | None:
    """Why a processor cannot run now (e.g. no API key), or None when it can.

    Processors opt in by defining `unavailable_reason()`; it is asked on every load, never
    cached, so fixing the configuration needs no restart.
    """
    check = getattr(processor, "unavailable_reason", None)
    return check() if callable(check) else None
