"""The errors every backend raises in the same terms."""

from __future__ import annotations


class StateError(Exception):
    """The state database cannot be used; the message is one line for the user."""


class PostgresError(Exception):
    """A PostgreSQL statement failed; the message is the server's first line. (DuckDB's own
    `duckdb.Error` plays this part for the embedded backend: see `state.db.DATABASE_ERRORS`.)"""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
