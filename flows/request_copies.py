"""The copies resumed sessions make of earlier requests, found when rows are written.

A resumed session copies earlier lines into a new file, so one request can sit in several
files; `usage_requests_unique` and every report keep one copy (processors/usage_reports.py,
`_COPY_ORDER`). Ranking every request's copies at query time cost a report ~0.3 s on 2M
requests; instead `usage_request_copies` lists the copies that are not kept, and each usage
commit brings it up to date for the requests of the sessions it writes: their keys before the
commit (rows it replaces or deletes) and after, in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

from processors.usage_reports import COPIES_OF_TOUCHED

_TOUCHED = "_usage_touched_keys"


def note_before(con: duckdb.DuckDBPyConnection, sessions: Sequence[str]) -> None:
    """Remember the request keys these sessions have now (about to be replaced)."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {_TOUCHED} AS "
        "SELECT DISTINCT message_id, request_id FROM usage_requests_raw "
        "WHERE session_file IN (SELECT UNNEST($1))",
        [list(sessions)],
    )


def refresh_after(con: duckdb.DuckDBPyConnection, sessions: Sequence[str]) -> None:
    """With the keys these sessions have after the change: list again which copies of each
    touched request are not kept."""
    con.execute(
        f"INSERT INTO {_TOUCHED} SELECT DISTINCT message_id, request_id FROM usage_requests_raw "
        "WHERE session_file IN (SELECT UNNEST($1))",
        [list(sessions)],
    )
    con.execute(
        f"""DELETE FROM usage_request_copies c WHERE EXISTS (
            SELECT 1 FROM {_TOUCHED} t
            WHERE c.message_id IS NOT DISTINCT FROM t.message_id
              AND c.request_id IS NOT DISTINCT FROM t.request_id)"""
    )
    con.execute(f"INSERT INTO usage_request_copies {COPIES_OF_TOUCHED.format(touched=_TOUCHED)}")
    con.execute(f"DROP TABLE {_TOUCHED}")
