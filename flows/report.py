"""`session-pipeline report` and `session-pipeline export`: answers without writing SQL.

`report daily|monthly|sessions|blocks|tools` prints a table for people (thousands separators,
dollars to the cent, a totals row, `*` on a cost that leaves out requests of a model without
a price), or `--json` (the daily and monthly totals under ccusage's keys) or `--csv`.
`export RELATION` streams a usage table or view out with DuckDB's own COPY (on a PostgreSQL
state: the rows read from PostgreSQL, written by an in-memory DuckDB, the same files).

Both only read: the state database is opened read-only, for as short a time as the query
takes; a run holding it makes them wait a few seconds at most, then say so in one line. Neither
imports Prefect. Register them on the command line with `register(commands)`.

On a PostgreSQL state (`SESSION_PIPELINE_DB=postgresql://…`) the reports run the same SQL
(processors/usage_reports.py, translated by the backend's `dialect`) and print the same output:
the JSON DuckDB makes there is made by PostgreSQL's `json_build_object` here, and times come
back in the zone DuckDB's client uses (this machine's).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb
import orjson

from processors import usage_reports as sql
from state import config
from state.config import ConfigError
from state.db import DATABASE_ERRORS, StateError, backend, connect

KINDS = ("daily", "monthly", "sessions", "blocks", "tools")
# A report waits this long at most for a run's lock (runs hold it for a commit, about a second).
LOCK_WAIT_SECONDS = 10.0
DOCUMENTED = frozenset({"knowledge_items", "verification_evidence", "verification_sessions"})
# The column `--since/--until` filter an exported relation on: the first it has.
TIME_COLUMNS = (
    "occurred_at",
    "started_at",
    "block_start",
    "day",
    "month",
    "first_seen_at",
    "first_used_at",
)
FORMATS = {"csv": "(FORMAT csv, HEADER)", "ndjson": "(FORMAT json)", "parquet": "(FORMAT parquet)"}


# --- arguments ---------------------------------------------------------------------------------


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def local_zone() -> str:
    """The process's time zone, as ccusage uses it: $TZ, else /etc/localtime's zone, else
    /etc/timezone, else UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        link = os.readlink("/etc/localtime")
        candidates.append(link.split("zoneinfo/", 1)[1] if "zoneinfo/" in link else "")
    except OSError:
        pass
    with suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    for name in candidates:
        if name and _zone_or_none(name) is not None:
            return name
    return "UTC"


def _zone_or_none(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _zone(name: str | None) -> tuple[str, ZoneInfo]:
    name = name or local_zone()
    zone = _zone_or_none(name)
    if zone is None:
        raise ConfigError(f"unknown time zone {name!r} (an IANA name such as Europe/Paris)")
    return name, zone


def _time_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=_date, metavar="YYYY-MM-DD", help="from this day on")
    parser.add_argument(
        "--until", type=_date, metavar="YYYY-MM-DD", help="up to this day, included"
    )
    parser.add_argument(
        "--timezone", metavar="ZONE", help="where days begin (default: this machine's zone)"
    )


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add the `report` and `export` commands; return their functions by name."""
    from flows.cli import _paths  # here: flows.cli imports this module

    report = commands.add_parser("report", help="usage per day, month, session, block or tool")
    report.add_argument("kind", choices=KINDS)
    _time_args(report)
    report.add_argument("--user", help="only this user")
    report.add_argument("--model", help="only models whose id contains this, e.g. opus-4-5")
    out = report.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV")
    _paths(report)

    export = commands.add_parser("export", help="stream a usage table or view out (DuckDB COPY)")
    export.add_argument("relation", help="usage_* table or view, knowledge_items, verification_*")
    export.add_argument("--format", choices=sorted(FORMATS), default="csv")
    _time_args(export)
    export.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    _paths(export)
    return {"report": cmd_report, "export": cmd_export}


# --- reading -----------------------------------------------------------------------------------


def _existing_db(flag: str | None) -> Path:
    db = config.db_path(flag)
    if not db.exists():
        raise StateError(
            f"no state yet at {db}: nothing has run there (`session-pipeline run --all` "
            "creates it; or pass --db / SESSION_PIPELINE_DB)"
        )
    return db


@contextmanager
def _reading(flag: str | None) -> Iterator[duckdb.DuckDBPyConnection]:
    db = _existing_db(flag)
    wait = min(config.lock_timeout(), LOCK_WAIT_SECONDS)
    with connect(db, read_only=True, lock_timeout=wait) as con:
        if _on_postgres(con):
            _local_times(con)
            _for_reports(con)
        yield con


def _on_postgres(con: Any) -> bool:
    return bool(backend(con).NAME == "postgresql")


def _local_times(con: Any) -> None:
    """Times come back from PostgreSQL in this machine's zone, as DuckDB's client gives them
    (its `TimeZone`, this machine's by default), so the same report prints the same times.
    (UTC when PostgreSQL does not know the zone.)"""
    try:
        con.execute("SELECT set_config('TimeZone', ?, false)", [local_zone()])
    except DATABASE_ERRORS:
        con.execute("SELECT set_config('TimeZone', 'UTC', false)")


# A report's one big query, on this connection only: compiling it (JIT) took longer than it
# saved, and its sorts and hashes of a few million rows spilled to disk at the default 4 MB
# (report daily on 2M requests: 25 s, 13 s with both).
_REPORT_SETTINGS = {"jit": "off", "work_mem": "64MB"}


def _for_reports(con: Any) -> None:
    for name, value in _REPORT_SETTINGS.items():
        con.execute("SELECT set_config(?, ?, false)", [name, value])


def _sql(con: Any, text: str) -> str:
    """The reports' SQL (DuckDB's) in the connection's dialect."""
    return str(backend(con).dialect(text))


def _relations(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        name
        for (name,) in con.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_schema = current_schema()"
        ).fetchall()
    }


def _need_usage(con: duckdb.DuckDBPyConnection, db_flag: str | None) -> None:
    relations = _relations(con)
    if {"usage_requests", "usage_requests_raw", "usage_events"} - relations:
        raise StateError(
            f"no usage data in {config.db_path(db_flag)} yet: `session-pipeline run usage` "
            "creates it"
        )
    if {"usage_retention", "usage_rollup_archive", "usage_prices", "usage_request_copies"} - (
        relations
    ):
        raise StateError(
            f"{config.db_path(db_flag)} was made by an older session-pipeline: one "
            "`session-pipeline run usage` brings its usage tables up to date"
        )


def _bounds(args: argparse.Namespace, zone: ZoneInfo) -> tuple[datetime | None, datetime | None]:
    """--since and --until as instants: the start of the first day, the end of the last."""
    if args.since and args.until and args.since > args.until:
        raise ConfigError(f"--since {args.since} is after --until {args.until}")
    since = datetime.combine(args.since, time(), zone) if args.since else None
    until = datetime.combine(args.until + timedelta(days=1), time(), zone) if args.until else None
    return since, until


def _filters(
    args: argparse.Namespace, zone: ZoneInfo, *, times: bool = True, model: bool = True
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    since, until = _bounds(args, zone)
    if times and since is not None:
        clauses.append("occurred_at >= ?")
        params.append(since)
    if times and until is not None:
        clauses.append("occurred_at < ?")
        params.append(until)
    if args.user:
        clauses.append("username = ?")
        params.append(args.user)
    if model and args.model:
        clauses.append("strpos(lower(model), lower(?)) > 0")
        params.append(args.model)
    return " AND ".join(clauses), params


# --- formatting --------------------------------------------------------------------------------


def _int(value: Any) -> str:
    return f"{int(value or 0):,}"


def _cost(value: Any, unpriced: Any) -> str:
    return f"${float(value or 0):,.2f}" + ("*" if unpriced else "")


def _when(value: datetime | None, zone: ZoneInfo) -> str:
    return value.astimezone(zone).strftime("%Y-%m-%d %H:%M") if value else ""


def _short(model: str) -> str:
    """`claude-sonnet-4-5-20250929` as people say it: `sonnet-4-5`."""
    return re.sub(r"-\d{8}$", "", model.removeprefix("claude-"))


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: int) -> str:
    """Columns from `numeric` on are right-aligned; a rule under the header and above the
    last row (the totals)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if i >= numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [line(r) for r in rows]
    if body:
        body.insert(len(body) - 1, rule)
    return "\n".join([line(header), rule, *body])


def _footnote(unpriced: int) -> str | None:
    if not unpriced:
        return None
    return (
        f"* partial: {unpriced:,} request(s) of models without a price are left out of the "
        "cost (price them in usage_price_overrides)"
    )


def _emit(
    args: argparse.Namespace,
    *,
    key: str,
    records: list[dict[str, Any]],
    totals: dict[str, Any] | None,
    header: Sequence[str],
    rows: Callable[[], list[list[str]]] | list[list[str]],
    numeric: int,
    unpriced: int,
) -> None:
    if args.json:
        document: dict[str, Any] = {key: records}
        if totals is not None:
            document["totals"] = totals
        sys.stdout.buffer.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
        return
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        names = list(records[0]) if records else []
        writer.writerow(names)
        for record in records:
            writer.writerow([" ".join(v) if isinstance(v, list) else v for v in record.values()])
        return
    if not records:
        print(f"no {key} match")
        return
    print(render_table(header, rows() if callable(rows) else rows, numeric))
    note = _footnote(unpriced)
    if note:
        print(note)


def _token_record(row: dict[str, Any], cost_key: str = "totalCost") -> dict[str, Any]:
    return {
        "inputTokens": int(row["input_tokens"]),
        "outputTokens": int(row["output_tokens"]),
        "cacheCreationTokens": int(row["cache_creation_input_tokens"]),
        "cacheReadTokens": int(row["cache_read_input_tokens"]),
        "totalTokens": int(row["total_tokens"]),
        cost_key: float(row["cost_usd"] or 0.0),
        "unpricedRequests": int(row["unpriced_requests"]),
    }


_TOKEN_HEADER = ["Input", "Output", "Cache write", "Cache read", "Total tokens", "Cost"]


def _token_cells(row: dict[str, Any]) -> list[str]:
    return [
        _int(row["input_tokens"]),
        _int(row["output_tokens"]),
        _int(row["cache_creation_input_tokens"]),
        _int(row["cache_read_input_tokens"]),
        _int(row["total_tokens"]),
        _cost(row["cost_usd"], row["unpriced_requests"]),
    ]


def _dicts(con: duckdb.DuckDBPyConnection, text: str, params: Sequence[Any]) -> list[dict]:
    try:
        cursor = con.execute(_sql(con, text), list(params))
        names = [d[0] for d in cursor.description or []]
        return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
    except DATABASE_ERRORS as error:
        raise StateError(str(error).splitlines()[0]) from None


# --- the reports -------------------------------------------------------------------------------


def _period_report(args: argparse.Namespace, con: duckdb.DuckDBPyConnection) -> None:
    zone_name, zone = _zone(args.timezone)
    grain = "day" if args.kind == "daily" else "month"
    where, params = _filters(args, zone)
    rows = _dicts(con, sql.report_period_sql(grain, zone_name, where), params)
    total = next((r for r in rows if r["level"] == 0), None)
    periods = [r for r in rows if r["level"] == 1]
    by_period: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        if r["level"] == 2:
            by_period.setdefault(r["period"], []).append(r)

    def label(day: date | None) -> str:
        if day is None:
            return "(no time)"
        return day.strftime("%Y-%m") if grain == "month" else day.isoformat()

    key = "date" if grain == "day" else "month"
    records = []
    for p in periods:
        models = [m for m in by_period.get(p["period"], []) if m["model"] is not None]
        records.append(
            {
                key: label(p["period"]),
                **_token_record(p),
                "modelsUsed": [m["model"] for m in models],
                "modelBreakdowns": [
                    {"modelName": m["model"], **_token_record(m, "cost")} for m in models
                ],
                "users": int(p["users"]),
                "sessions": int(p["sessions"]),
                "requests": int(p["requests"]),
            }
        )
    totals = _token_record(total) if total is not None and periods else None
    if totals is not None and total is not None:
        totals.update(
            users=int(total["users"]),
            sessions=int(total["sessions"]),
            requests=int(total["requests"]),
        )
    header = [key.capitalize(), "Models", "Users", "Sessions", "Requests", *_TOKEN_HEADER]
    table = [
        [
            label(p["period"]),
            ", ".join(_short(m["model"]) for m in by_period.get(p["period"], []) if m["model"]),
            _int(p["users"]),
            _int(p["sessions"]),
            _int(p["requests"]),
            *_token_cells(p),
        ]
        for p in periods
    ]
    if total is not None and periods:
        table.append(
            [
                "Total",
                "",
                _int(total["users"]),
                _int(total["sessions"]),
                _int(total["requests"]),
                *_token_cells(total),
            ]
        )
    if args.csv:
        for r in records:
            r.pop("modelBreakdowns")
    _emit(
        args,
        key="daily" if grain == "day" else "monthly",
        records=records,
        totals=totals,
        header=header,
        rows=table,
        numeric=2,
        unpriced=int(total["unpriced_requests"] or 0) if total else 0,
    )


# The JSON of `report sessions`, made by DuckDB: a state of 100k sessions made and printed its
# records in Python in about as long as the query took.
_TOKEN_JSON = (
    ("inputTokens", "input_tokens::BIGINT"),
    ("outputTokens", "output_tokens::BIGINT"),
    ("cacheCreationTokens", "cache_creation_input_tokens::BIGINT"),
    ("cacheReadTokens", "cache_read_input_tokens::BIGINT"),
    ("totalTokens", "total_tokens::BIGINT"),
    ("totalCost", "coalesce(cost_usd, 0)::DOUBLE"),
    ("unpricedRequests", "unpriced_requests::BIGINT"),
)
_SESSION_JSON = (
    ("sessionId", "session"),
    ("username", "username"),
    ("firstActivity", "first_request_at"),
    ("lastActivity", "last_request_at"),
    ("modelsUsed", "coalesce(models, CAST(ARRAY[] AS VARCHAR[]))"),
    ("requests", "requests::BIGINT"),
    *_TOKEN_JSON,
)
_SESSION_TOTALS_JSON = (
    ("sessions", "count(*)"),
    ("requests", "sum(requests)::BIGINT"),
    *((name, f"sum({expr.split('::')[0]})::{expr.split('::')[1]}") for name, expr in _TOKEN_JSON),
)


def _struct(fields: Sequence[tuple[str, str]]) -> str:
    return "to_json({" + ", ".join(f"'{name}': {expr}" for name, expr in fields) + "})"


def _json_object(fields: Sequence[tuple[str, str]]) -> str:
    """`_struct`'s JSON as PostgreSQL makes it."""
    return "json_build_object(" + ", ".join(f"'{name}', {expr}" for name, expr in fields) + ")"


def _compact(doc: str, doubles: frozenset[str]) -> str:
    """PostgreSQL's JSON of a record as DuckDB writes it: compact, DOUBLEs with a fraction."""
    record = orjson.loads(doc)
    for name in doubles & record.keys():
        if isinstance(record[name], int):
            record[name] = float(record[name])
    return orjson.dumps(record).decode()


def _json_document(
    con: duckdb.DuckDBPyConnection,
    key: str,
    query: str,
    params: Sequence[Any],
    fields: Sequence[tuple[str, str]],
    totals: Sequence[tuple[str, str]],
    order: Sequence[str],
) -> bytes:
    """`{key: [records], "totals": {…}}` made by DuckDB from the rows of `query` (the totals
    left out when there are none), in `order` (columns of `query`; text in bytes' order)."""
    text_columns = {"session", "username"}
    order_by = ", ".join(f'{c} COLLATE "C"' if c in text_columns else c for c in order)
    postgres = _on_postgres(con)
    make = _json_object if postgres else _struct
    try:
        rows = con.execute(
            _sql(
                con,
                f"""WITH s AS MATERIALIZED ({query})
            SELECT * FROM (
                SELECT 0 AS part, {make(fields)} AS doc, {", ".join(order)} FROM s
                UNION ALL
                SELECT 1, {make(totals)}, {", ".join("NULL" for _ in order)}
                FROM s HAVING count(*) > 0
            ) documents ORDER BY part, {order_by}""",
            ),
            list(params),
        ).fetchall()
    except DATABASE_ERRORS as error:
        raise StateError(str(error).splitlines()[0]) from None
    records = [row[1] for row in rows if row[0] == 0]
    summed = [row[1] for row in rows if row[0] == 1]
    if postgres:
        doubles = frozenset(name for name, expr in (*fields, *totals) if expr.endswith("DOUBLE"))
        records = [_compact(doc, doubles) for doc in records]
        summed = [_compact(doc, doubles) for doc in summed]
    text = f'{{"{key}": [\n' + ",\n".join(records) + "\n]"
    if summed:
        text += ', "totals": ' + summed[0]
    return (text + "}\n").encode()


_UTC_ISO = "'%Y-%m-%dT%H:%M:%S.%gZ'"
_BLOCK_JSON = (
    ("username", "username"),
    ("startTime", f"strftime(timezone('UTC', block_start), {_UTC_ISO})"),
    ("endTime", f"strftime(timezone('UTC', block_end), {_UTC_ISO})"),
    ("actualEndTime", f"strftime(timezone('UTC', last_request_at), {_UTC_ISO})"),
    ("isActive", "coalesce(is_active, false)"),
    ("requests", "requests::BIGINT"),
    *_TOKEN_JSON,
)
_BLOCK_TOTALS_JSON = (("blocks", "count(*)"), *_SESSION_TOTALS_JSON[1:])


def _sessions_report(args: argparse.Namespace, con: duckdb.DuckDBPyConnection) -> None:
    zone_name, zone = _zone(args.timezone)
    where, params = _filters(args, zone)
    query = sql.report_sessions_sql(zone_name, where)
    if args.json:
        document = _json_document(
            con,
            "sessions",
            query,
            params,
            _SESSION_JSON,
            _SESSION_TOTALS_JSON,
            ("last_request_at", "session"),
        )
        sys.stdout.buffer.write(document)
        return
    sessions = _dicts(con, query, params)
    records = [
        {
            "sessionId": s["session"],
            "username": s["username"],
            "firstActivity": s["first_request_at"],
            "lastActivity": s["last_request_at"],
            "modelsUsed": s["models"] or [],
            "requests": int(s["requests"]),
            **_token_record(s),
        }
        for s in sessions
    ]
    total = _sums(sessions)
    totals = None
    if sessions:
        totals = {"sessions": len(sessions), "requests": total["requests"]}
        totals.update(_token_record(total))

    def table() -> list[list[str]]:
        rows = [
            [
                s["session"] or "",
                s["username"] or "",
                s["last_local"] or "",
                ", ".join(_short(m) for m in s["models"] or []),
                _int(s["requests"]),
                *_token_cells(s),
            ]
            for s in sessions
        ]
        rows.append(["Total", "", "", "", _int(total["requests"]), *_token_cells(total)])
        return rows

    _emit(
        args,
        key="sessions",
        records=records,
        totals=totals,
        header=["Session", "User", "Last activity", "Models", "Requests", *_TOKEN_HEADER],
        rows=table,
        numeric=4,
        unpriced=total["unpriced_requests"],
    )


def _sums(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The token, request and cost figures of `rows` added up."""
    keys = ("requests", *sql.TOKEN_COLUMNS, "total_tokens", "unpriced_requests")
    sums: dict[str, Any] = {k: sum(int(r[k]) for r in rows) for k in keys}
    sums["cost_usd"] = sum(float(r["cost_usd"] or 0) for r in rows)
    return sums


def _blocks_report(args: argparse.Namespace, con: duckdb.DuckDBPyConnection) -> None:
    if args.model:
        raise ConfigError("--model does not apply to blocks: a block is metered over every model")
    _, zone = _zone(args.timezone)
    where, params = _filters(args, zone, times=False)
    since, until = _bounds(args, zone)
    outer, outer_params = [], []
    if since is not None:
        outer.append("block_start >= ?")
        outer_params.append(since)
    if until is not None:
        outer.append("block_start < ?")
        outer_params.append(until)
    text = f"SELECT * FROM ({sql.blocks_sql(where)}) blocks"
    if outer:
        text += " WHERE " + " AND ".join(outer)
    if args.json:  # made by DuckDB, times in UTC (ISO 8601, `Z`)
        document = _json_document(
            con,
            "blocks",
            text,
            [*params, *outer_params],
            _BLOCK_JSON,
            _BLOCK_TOTALS_JSON,
            ("block_start", "username"),
        )
        sys.stdout.buffer.write(document)
        return
    text += ' ORDER BY block_start, username COLLATE "C"'
    blocks = _dicts(con, text, [*params, *outer_params])
    records = [
        {
            "username": b["username"],
            "startTime": b["block_start"].isoformat(),
            "endTime": b["block_end"].isoformat(),
            "actualEndTime": b["last_request_at"].isoformat(),
            "isActive": bool(b["is_active"]),
            "requests": int(b["requests"]),
            **_token_record(b),
        }
        for b in blocks
    ]
    sums = _sums(blocks)
    totals = None
    if blocks:
        totals = {"blocks": len(blocks), "requests": sums["requests"], **_token_record(sums)}

    def table() -> list[list[str]]:  # (made only for the terminal: 0.2 s on 33k blocks)
        rows = [
            [
                b["username"],
                _when(b["block_start"], zone),
                _when(b["last_request_at"], zone),
                "active" if b["is_active"] else "",
                _int(b["requests"]),
                *_token_cells(b),
            ]
            for b in blocks
        ]
        if blocks:
            rows.append(
                [
                    "Total",
                    f"{len(blocks):,} blocks",
                    "",
                    "",
                    _int(sums["requests"]),
                    *_token_cells(sums),
                ]
            )
        return rows

    _emit(
        args,
        key="blocks",
        records=records,
        totals=totals,
        header=["User", "Block start", "Last request", "Active", "Requests", *_TOKEN_HEADER],
        rows=table,
        numeric=4,
        unpriced=int(sums["unpriced_requests"]),
    )


def _tools_report(args: argparse.Namespace, con: duckdb.DuckDBPyConnection) -> None:
    _, zone = _zone(args.timezone)
    where, params = _filters(args, zone)
    tools = _dicts(
        con,
        f"SELECT * FROM ({sql.tools_sql(where)}) tools "
        'ORDER BY event_type COLLATE "C", calls DESC, name COLLATE "C"',
        params,
    )
    records = [
        {
            "type": t["event_type"],
            "name": t["name"],
            "calls": int(t["calls"]),
            "errors": int(t["errors"]),
            "errorRate": float(t["error_rate"]),
            "users": int(t["users"]),
            "sessions": int(t["sessions"]),
            "firstUsed": t["first_used_at"].isoformat() if t["first_used_at"] else None,
            "lastUsed": t["last_used_at"].isoformat() if t["last_used_at"] else None,
        }
        for t in tools
    ]
    table = [
        [
            t["event_type"],
            t["name"] or "",
            _when(t["first_used_at"], zone),
            _when(t["last_used_at"], zone),
            _int(t["calls"]),
            _int(t["errors"]),
            f"{float(t['error_rate']):.1%}",
            _int(t["users"]),
            _int(t["sessions"]),
        ]
        for t in tools
    ]
    totals = None
    if tools:
        calls, errors = sum(int(t["calls"]) for t in tools), sum(int(t["errors"]) for t in tools)
        totals = {"calls": calls, "errors": errors}
        table.append(
            [
                "Total",
                "",
                "",
                "",
                _int(calls),
                _int(errors),
                f"{errors / calls:.1%}" if calls else "",
                "",
                "",
            ]
        )
    _emit(
        args,
        key="tools",
        records=records,
        totals=totals,
        header=[
            "Type",
            "Name",
            "First used",
            "Last used",
            "Calls",
            "Errors",
            "Error rate",
            "Users",
            "Sessions",
        ],
        rows=table,
        numeric=4,
        unpriced=0,
    )


_REPORTS = {
    "daily": _period_report,
    "monthly": _period_report,
    "sessions": _sessions_report,
    "blocks": _blocks_report,
    "tools": _tools_report,
}


def cmd_report(args: argparse.Namespace) -> int:
    _zone(args.timezone)  # a wrong zone is said before the database is opened
    with _reading(args.db) as con:
        _need_usage(con, args.db)
        _REPORTS[args.kind](args, con)
    return 0


# --- export ------------------------------------------------------------------------------------

_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def _columns(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    return dict(
        con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_catalog = current_database() AND table_schema = current_schema() "
            "AND table_name = ? ORDER BY ordinal_position",
            [relation],
        ).fetchall()
    )


def _export_query(
    args: argparse.Namespace, con: duckdb.DuckDBPyConnection
) -> tuple[str, list[Any]]:
    relation = args.relation
    if not _NAME.fullmatch(relation) or not (
        relation.startswith("usage_") or relation in DOCUMENTED
    ):
        raise ConfigError(
            f"cannot export {relation!r}: only usage_* tables and views, "
            + ", ".join(sorted(DOCUMENTED))
        )
    columns = _columns(con, relation)
    if not columns:
        raise StateError(
            f"no table or view {relation} in {config.db_path(args.db)} "
            "(its processor creates it when it runs)"
        )
    text = f'SELECT * FROM "{relation}"'
    if not (args.since or args.until):
        return text, []
    column = next((c for c in TIME_COLUMNS if c in columns), None)
    if column is None:
        raise ConfigError(f"{relation} has no time column: --since/--until cannot filter it")
    _, zone = _zone(args.timezone)
    clauses, params = [], []
    if columns[column].upper() == "DATE":  # day, month: compared as dates (a month: 1st day)
        if args.since:
            clauses.append(f"{column} >= ?")
            start = args.since.replace(day=1) if column == "month" else args.since
            params.append(start)
        if args.until:
            clauses.append(f"{column} <= ?")
            params.append(args.until)
        if args.since and args.until and args.since > args.until:
            raise ConfigError(f"--since {args.since} is after --until {args.until}")
    else:
        since, until = _bounds(args, zone)
        if since is not None:
            clauses.append(f"{column} >= ?")
            params.append(since)
        if until is not None:
            clauses.append(f"{column} < ?")
            params.append(until)
    return f"{text} WHERE {' AND '.join(clauses)}", params


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "parquet" and not args.output:
        raise ConfigError("--format parquet needs -o FILE (parquet is not written to stdout)")
    if args.timezone:
        _zone(args.timezone)
    if args.output:
        with _reading(args.db) as con:
            query, params = _export_query(args, con)
            _copy(con, query, params, Path(args.output), args.format)
        return 0
    # DuckDB writes files, not Python's stdout: a file of our own, streamed out once the
    # database is let go (a COPY to /dev/stdout would truncate the file of a redirect, or
    # overwrite a `>>` one from its start).
    with tempfile.TemporaryDirectory(prefix="session-pipeline-export-") as folder:
        path = Path(folder) / f"export.{args.format}"
        with _reading(args.db) as con:
            query, params = _export_query(args, con)
            _copy(con, query, params, path, args.format)
        sys.stdout.flush()
        with path.open("rb") as source:
            shutil.copyfileobj(source, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
    return 0


def _copy(
    con: duckdb.DuckDBPyConnection, query: str, params: list[Any], path: Path, fmt: str
) -> None:
    if _on_postgres(con):
        _copy_from_postgres(con, query, params, path, fmt)
        return
    target = str(path).replace("'", "''")
    try:
        con.execute(f"COPY ({query}) TO '{target}' {FORMATS[fmt]}", params)
    except duckdb.Error as error:
        raise StateError(f"export to {path} failed: {str(error).splitlines()[0]}") from None


# PostgreSQL's types as DuckDB reads them back (any other: its text).
_DUCKDB_TYPES = {
    "character varying": "VARCHAR",
    "text": "VARCHAR",
    "bigint": "BIGINT",
    "integer": "INTEGER",
    "smallint": "SMALLINT",
    "double precision": "DOUBLE",
    "real": "FLOAT",
    "boolean": "BOOLEAN",
    "timestamp with time zone": "TIMESTAMPTZ",
    "timestamp without time zone": "TIMESTAMP",
    "date": "DATE",
}


def _literal(value: Any) -> str:
    """A --since/--until bound as SQL text (PostgreSQL's COPY takes no parameters): a date or
    an aware datetime, made by this module, never text a user typed."""
    if isinstance(value, datetime):
        return f"CAST('{value.isoformat()}' AS TIMESTAMPTZ)"
    if isinstance(value, date):
        return f"CAST('{value.isoformat()}' AS DATE)"
    raise TypeError(f"not a date: {value!r}")


def _copy_from_postgres(con: Any, query: str, params: list[Any], path: Path, fmt: str) -> None:
    """The rows of `query` in PostgreSQL, written by an in-memory DuckDB as the embedded
    backend writes them: PostgreSQL's COPY streams them as CSV (times in UTC) to a file of our
    own, DuckDB reads it back with the relation's column types and COPYs it out."""
    relation = re.fullmatch(r'SELECT \* FROM "([a-z_][a-z0-9_]*)".*', query, re.S)
    if relation is None:
        raise StateError(f"cannot export {query!r} from PostgreSQL")
    types = {
        name: _DUCKDB_TYPES.get(kind.lower(), "VARCHAR")
        for name, kind in _columns(con, relation.group(1)).items()
    }
    text = query
    for value in params:  # only `?` placeholders of _export_query, in order
        text = text.replace("?", _literal(value), 1)
    with tempfile.TemporaryDirectory(prefix="session-pipeline-export-") as folder:
        rows = Path(folder) / "rows.csv"
        try:
            con.execute("BEGIN TRANSACTION READ ONLY")
            try:
                con.execute("SET LOCAL TimeZone = 'UTC'")
                with (
                    rows.open("wb") as out,
                    con.raw.cursor().copy(f"COPY ({text}) TO STDOUT (FORMAT csv, HEADER)") as copy,
                ):
                    for chunk in copy:
                        out.write(chunk)
            finally:
                con.execute("ROLLBACK")
        except DATABASE_ERRORS as error:
            raise StateError(f"export to {path} failed: {str(error).splitlines()[0]}") from None
        except Exception as error:  # psycopg's own, raised by the COPY outside execute()
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise StateError(f"export to {path} failed: {first}") from None
        columns = ", ".join(f"'{name}': '{kind}'" for name, kind in types.items())
        source = str(rows).replace("'", "''")
        target = str(path).replace("'", "''")
        writer = duckdb.connect()
        try:
            writer.execute(
                f"COPY (SELECT * FROM read_csv('{source}', header = true, columns = {{{columns}}}, "
                "delim = ',', quote = '\"', escape = '\"', allow_quoted_nulls = false, "
                f"auto_detect = false)) TO '{target}' {FORMATS[fmt]}"
            )
        except duckdb.Error as error:
            raise StateError(f"export to {path} failed: {str(error).splitlines()[0]}") from None
        finally:
            writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.report …`: the command line (flows/cli.py), which has this command."""
    from flows.cli import main as command_line

    return command_line(argv)


if __name__ == "__main__":
    sys.exit(main())
