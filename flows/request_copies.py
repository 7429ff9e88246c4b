"""The copies resumed sessions make of earlier requests, found when rows are written.

A resumed session copies earlier lines into a new file, so one request can sit in several
files; `usage_requests_unique` and every report keep one copy (processors/usage_reports.py,
`_COPY_ORDER`). Ranking every request's copies at query time cost a report ~0.3 s on 2M
requests; instead `usage_request_copies` lists the copies that are not kept, and each usage
commit brings it up to date, in the same transaction, for the requests it touches: the keys
an increment writes (it replaces rows by key, so those are all it changes), and for a session
written whole or deleted, every key it had before and has after.
"""

from __future__ import annotations

from collections.abc import Sequence

from processors.usage_reports import COPIES_OF_TOUCHED, COPIES_OF_TOUCHED_BY_INDEX, same_request
from state.db import Connection, backend
from state.store import Outcome

_TOUCHED = "_usage_touched_keys"
_REQUESTS = "usage_requests_raw"


def _session_keys(con: Connection, sessions: Sequence[str]) -> None:
    if sessions:
        con.execute(
            f"INSERT INTO {_TOUCHED} SELECT DISTINCT message_id, request_id FROM {_REQUESTS} "
            "WHERE session_file IN (SELECT UNNEST($1::VARCHAR[]))",
            [list(sessions)],
        )


def note_before(
    con: Connection,
    whole: Sequence[str],
    keys: tuple[list[str | None], list[str | None]] = ([], []),
) -> None:
    """Before the change: the keys of the sessions written whole (or deleted) as they are
    now, and the (message ids, request ids) increments write."""
    con.execute(f"DROP TABLE IF EXISTS {_TOUCHED}")
    con.execute(f"CREATE TEMP TABLE {_TOUCHED} (message_id VARCHAR, request_id VARCHAR)")
    _session_keys(con, whole)
    if keys[0]:
        con.execute(
            f"INSERT INTO {_TOUCHED} SELECT UNNEST($1::VARCHAR[]), UNNEST($2::VARCHAR[])",
            list(keys),
        )


def refresh_after(con: Connection, whole: Sequence[str]) -> None:
    """After the change: the keys the sessions written whole have now, then the copies not
    kept of every touched request listed again."""
    _session_keys(con, whole)
    if backend(con).NAME == "postgresql":
        # Keys compared by equalities PostgreSQL hashes, and looked up in the requests' index
        # (the temporary table's size known: a few keys are looked up, not every row read).
        con.execute(f"ANALYZE {_TOUCHED}")
        con.execute(
            f"""DELETE FROM usage_request_copies c USING (
                SELECT DISTINCT message_id, request_id FROM {_TOUCHED}) t
            WHERE {same_request("c", "t")}"""
        )
        copies = COPIES_OF_TOUCHED_BY_INDEX
    else:
        con.execute(
            f"""DELETE FROM usage_request_copies c WHERE EXISTS (
                SELECT 1 FROM {_TOUCHED} t
                WHERE c.message_id IS NOT DISTINCT FROM t.message_id
                  AND c.request_id IS NOT DISTINCT FROM t.request_id)"""
        )
        copies = COPIES_OF_TOUCHED
    con.execute(f"INSERT INTO usage_request_copies {copies.format(touched=_TOUCHED)}")
    con.execute(f"DROP TABLE {_TOUCHED}")


def touched(outcomes: Sequence[Outcome]) -> tuple[list[str], tuple[list, list]]:
    """The sessions a commit writes whole, and the request keys its increments write."""
    whole: list[str] = []
    messages: list[str | None] = []
    requests: list[str | None] = []
    for o in outcomes:
        if o.status != "processed":
            continue
        columns = o.columns.get(_REQUESTS)
        if o.increment and columns is not None:
            messages.extend(columns.get("message_id", []))
            requests.extend(columns.get("request_id", []))
        elif o.increment and _REQUESTS not in o.documents:
            continue  # an increment that wrote no request
        else:
            whole.append(o.key)
    return whole, (messages, requests)


def forget_hooks() -> tuple:
    """`store.forget_missing`'s `around`: deleted sessions are written whole, to nothing."""
    return (lambda con, sessions: note_before(con, sessions), refresh_after)
