"""`session-pipeline migrate --to URL`: the embedded DuckDB state (`--db`) into PostgreSQL.

Without `--to`, `migrate` is the command line's own (create or upgrade the state database).
The work is `state.transfer.migrate_state`; this prints its progress on stderr and the row
counts of every table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from state import config
from state.db import describe, location

if TYPE_CHECKING:
    from state.transfer import TableCopy


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `--to` to the `migrate` command; return its function."""
    parser = commands.choices["migrate"]
    parser.add_argument(
        "--to",
        metavar="URL",
        help="copy the DuckDB state (--db) into this PostgreSQL database, an empty schema, "
        "in one transaction (postgresql://user@host/db[?options=-csearch_path%%3Dschema])",
    )
    return {"migrate": cmd_migrate}


def cmd_migrate(args: argparse.Namespace) -> int:
    if getattr(args, "to", None) is None:
        from flows.cli import cmd_migrate as upgrade  # here: flows.cli imports this module

        return upgrade(args)
    from state.transfer import CountMismatchError, migrate_state

    source, target = config.db_path(args.db), location(args.to)
    started = time.monotonic()
    try:
        copies = migrate_state(source, target, progress=_progress)
    except CountMismatchError as error:
        print(_counts(error.copies))
        raise
    print(_counts(copies))
    rows = sum(c.target_rows for c in copies)
    print(
        f"\ncopied {len(copies)} tables ({rows:,} rows) from {describe(source)} to "
        f"{describe(target)} in {time.monotonic() - started:.1f}s; point SESSION_PIPELINE_DB "
        "(or --db) at that URL from now on"
    )
    return 0


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _counts(copies: Sequence[TableCopy]) -> str:
    from flows.cli import _table

    rows = [
        [
            c.name,
            f"{c.source_rows:,}",
            f"{c.target_rows:,}",
            "ok" if c.ok else "MISMATCH",
            f"{c.seconds:.1f}",
        ]
        for c in copies
    ]
    return _table(rows, ["table", "duckdb rows", "postgresql rows", "check", "seconds"])
