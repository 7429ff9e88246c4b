"""The processor contract.

A processor is a plain object that turns one session transcript into rows. It never opens
the database: the pipeline owns storage, so processors are pure, trivially testable, can run
in threads or processes, and never fight over the DuckDB write lock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

    def __post_init__(self) -> None:
        if "session_file" not in self.column_names:
            raise ValueError(f"output table {self.name!r} needs a session_file column")

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def value_types(self) -> tuple[str, ...]:
        """Each column's type without its constraints (`VARCHAR NOT NULL` -> `VARCHAR`)."""
        return tuple(
            _CONSTRAINT.split(sql_type, maxsplit=1)[0].strip() for _, sql_type in self.columns
        )

    @property
    def ddl(self) -> str:
        cols = ",\n    ".join(f"{name} {sql_type}" for name, sql_type in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n    {cols}\n)"


@dataclass
class ProcessResult:
    """What `process` returns: rows per output table (dicts keyed by column name; missing
    columns are NULL) and the number of items extracted, reported in run figures."""

    rows: dict[str, list[Row]] = field(default_factory=dict)
    items: int = 0


@runtime_checkable
class Processor(Protocol):
    """What the pipeline needs from a processor.

    `version` is part of every state row: changing it reprocesses every session for this
    processor alone. `cadence_seconds` is the default interval between scheduled runs.
    `views` are `CREATE OR REPLACE VIEW` statements run after the tables exist.
    """

    name: str
    version: str
    cadence_seconds: int
    tables: Sequence[Table]
    views: Sequence[str]

    def process(self, session: Session) -> ProcessResult: ...


def unavailable_reason(processor: object) -> str | None:
    """Why a processor cannot run now (e.g. no API key), or None when it can.

    Processors opt in by defining `unavailable_reason()`; it is asked on every load, never
    cached, so fixing the configuration needs no restart.
    """
    check = getattr(processor, "unavailable_reason", None)
    return check() if callable(check) else None
