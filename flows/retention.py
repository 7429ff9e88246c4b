"""Retention of usage detail: `USAGE_EVENTS_RETENTION_DAYS` and `session-pipeline prune`.

Requests (`usage_requests_raw`) and tool calls (`usage_events`) older than N days are deleted
at the end of each usage run (`apply_retention`, called in the run's last transaction) or on
demand (`prune [--days N]`). Their day and month figures are kept: before anything is
deleted, the requests' rollup parts go to `usage_rollup_archive` (processors/usage_reports.py),
which `usage_daily`, `usage_monthly` and `report daily|monthly` add to the live rows. Session
summaries (`usage_sessions_raw`) are kept whole.

The cutoff is stored in `usage_retention` and never moves back. Rows older than it that come
back (a version bump reads old files again) are left out of the report views and deleted at
the next run's end, never archived twice.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb

from processors import usage_reports as sql
from state import config
from state.config import ConfigError
from state.db import StateError, backend, connect, processor_lock, transaction

ENV = "USAGE_EVENTS_RETENTION_DAYS"
USAGE_TABLES = ("usage_requests_raw", "usage_events", "usage_rollup_archive", "usage_retention")


@dataclass(frozen=True)
class RetentionResult:
    """What one application of retention did."""

    days: int
    cutoff: datetime  # rows before this instant are gone (their rollups archived)
    previous_cutoff: datetime | None
    requests_archived: int  # distinct requests whose figures went to the archive
    request_rows_deleted: int  # usage_requests_raw rows (copies of resumed sessions included)
    events_deleted: int

    def describe(self) -> str:
        return (
            f"pruned usage before {self.cutoff.isoformat(timespec='seconds')} "
            f"({self.days} days): {self.requests_archived:,} request(s) archived into the daily "
            f"and monthly rollups, {self.request_rows_deleted:,} request row(s) and "
            f"{self.events_deleted:,} event(s) deleted"
        )


def retention_days(env: dict[str, str] | None = None) -> int | None:
    """`USAGE_EVENTS_RETENTION_DAYS`: None when unset or 0 (keep everything); anything but a
    whole number of days >= 0 is a ConfigError."""
    raw = (os.environ if env is None else env).get(ENV)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{ENV} must be a whole number of days (0 keeps everything), got {raw!r}")
    return value or None


def stored_cutoff(con: duckdb.DuckDBPyConnection) -> datetime | None:
    row = con.execute(f"SELECT {sql.CUTOFF}").fetchone()
    return row[0] if row else None


def prune(
    con: duckdb.DuckDBPyConnection, days: int, now: datetime | None = None
) -> RetentionResult:
    """Archive the rollups of the requests older than `days` days before `now`, then delete
    them and the events as old, in the caller's transaction. The cutoff only moves forward:
    a larger `days` than before deletes nothing more and restores nothing."""
    if days <= 0:
        raise ConfigError(f"retention needs a positive number of days, got {days}")
    now = now or datetime.now(UTC)
    previous = stored_cutoff(con)
    cutoff = now - timedelta(days=days)
    if previous is not None and previous > cutoff:
        cutoff = previous
    archived = _archived(con)
    con.execute(backend(con).dialect(sql.archive_sql()), [now, cutoff])
    archived = _archived(con) - archived
    requests = _deleted(con, "usage_requests_raw", cutoff)
    events = _deleted(con, "usage_events", cutoff)
    con.execute(
        "INSERT INTO usage_retention (id, cutoff, days, applied_at) VALUES (1, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET cutoff = EXCLUDED.cutoff, days = EXCLUDED.days, "
        "applied_at = EXCLUDED.applied_at",
        [cutoff, days, now],
    )
    return RetentionResult(
        days=days,
        cutoff=cutoff,
        previous_cutoff=previous,
        requests_archived=archived,
        request_rows_deleted=requests,
        events_deleted=events,
    )


def _archived(con: duckdb.DuckDBPyConnection) -> int:
    row = con.execute("SELECT coalesce(sum(requests), 0) FROM usage_rollup_archive").fetchone()
    return int(row[0]) if row else 0


def _deleted(con: duckdb.DuckDBPyConnection, table: str, cutoff: datetime) -> int:
    """Delete the rows of `table` older than `cutoff`; how many. (DuckDB's DELETE answers
    with the count; PostgreSQL's with nothing, so the deleted rows are counted there.)"""
    if backend(con).NAME == "postgresql":
        row = con.execute(
            f"WITH gone AS (DELETE FROM {table} WHERE occurred_at < ? RETURNING 1) "
            "SELECT count(*) FROM gone",
            [cutoff],
        ).fetchone()
    else:
        row = con.execute(f"DELETE FROM {table} WHERE occurred_at < ?", [cutoff]).fetchone()
    return int(row[0]) if row else 0


def apply_retention(con: duckdb.DuckDBPyConnection) -> RetentionResult | None:
    """The end of a usage run: prune by `USAGE_EVENTS_RETENTION_DAYS`, in the caller's
    transaction on a writable connection whose usage tables exist. None when it is unset or
    0; a ConfigError when it is invalid."""
    days = retention_days()
    if days is None:
        return None
    return prune(con, days)


# --- the command line --------------------------------------------------------------------------


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add the `prune` command; return its function by name."""
    from flows.cli import _paths, _positive_int  # here: flows.cli may import this module

    parser = commands.add_parser(
        "prune",
        help="delete usage requests and events older than N days (daily/monthly figures kept)",
    )
    parser.add_argument("--days", type=_positive_int, help=f"keep this many days (default: {ENV})")
    _paths(parser)
    return {"prune": cmd_prune}


def cmd_prune(args: argparse.Namespace) -> int:
    days = args.days if args.days is not None else retention_days()
    if days is None:
        raise ConfigError(f"nothing to prune: pass --days N or set {ENV}")
    db = config.db_path(args.db)
    if not db.exists():
        raise StateError(f"no state yet at {db}: nothing to prune")
    # One usage run at a time on this host: a prune is a run's last step taken alone.
    with processor_lock(db, "usage"), connect(db) as con:
        tables = {
            name
            for (name,) in con.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_catalog = current_database() AND table_schema = current_schema()"
            ).fetchall()
        }
        if not set(USAGE_TABLES) <= tables:
            raise StateError(
                f"no usage data in {db} yet (or made by an older version): "
                "`session-pipeline run usage` creates it"
            )
        with transaction(con):
            result = prune(con, days)
    print(result.describe())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.retention …`: the command line (flows/cli.py), which has this command."""
    from flows.cli import main as command_line

    return command_line(argv)


if __name__ == "__main__":
    sys.exit(main())
