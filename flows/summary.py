"""What a processor's run tells people in the Prefect UI beyond its figures: who used what,
without SQL. One markdown document per processor that has one (`SUMMARIES`). Its SQL runs on
DuckDB and PostgreSQL alike (text ordered by bytes, `COLLATE "C"`, whatever the database's
collation)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, timedelta
from typing import Any

import duckdb

DAYS = 7
TOP_TOOLS = 10


def _money(value: float | None) -> str:
    return "n/a" if value is None else f"${value:,.2f}"


def usage_summary(con: duckdb.DuckDBPyConnection) -> str:
    """The last 7 days per user (requests, tokens, cost) and the ten most used tools with
    their error rates, from the usage views: the 7 days up to the newest request (today's
    week on a live state; the latest week of an archive)."""
    (newest,) = con.execute(
        "SELECT least(max(occurred_at), now()) FROM usage_requests_unique HAVING count(*) > 0"
    ).fetchone() or (None,)
    if newest is None:
        return f"# Usage, last {DAYS} days\n\nNo requests yet.\n"
    since = newest - timedelta(days=DAYS)
    users = con.execute(
        """
        SELECT username, count(*) AS requests,
               sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)
                   + coalesce(cache_creation_input_tokens, 0)
                   + coalesce(cache_read_input_tokens, 0)) AS tokens,
               sum(output_tokens) AS output_tokens, sum(cost_usd) AS cost,
               count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced
        FROM usage_requests_unique
        WHERE occurred_at > $1
        GROUP BY 1 ORDER BY cost DESC NULLS LAST, requests DESC, username COLLATE "C"
        """,
        [since],
    ).fetchall()
    tools = con.execute(
        f"""
        SELECT * FROM (
            SELECT coalesce(skill_name, subagent_type, mcp_server || '/' || mcp_tool,
                            '/' || command_name, tool_name) AS name,
                   event_type, count(*) AS calls, count(*) FILTER (WHERE is_error) AS errors
            FROM usage_events
            WHERE occurred_at > $1
            GROUP BY 1, 2
        ) tools
        ORDER BY calls DESC, name COLLATE "C", event_type COLLATE "C" LIMIT {TOP_TOOLS}
        """,
        [since],
    ).fetchall()
    # (in UTC whatever zone the connection gives times in: DuckDB's is this machine's)
    title = f"# Usage, the {DAYS} days to {newest.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    lines = [title, "", "| user | requests | tokens | output | cost |"]
    lines.append("|---|---:|---:|---:|---:|")
    for username, requests, tokens, output, cost, unpriced in users:
        mark = f" ({unpriced} unpriced)" if unpriced else ""
        lines.append(
            f"| {username} | {requests:,} | {tokens or 0:,} | {output or 0:,} | "
            f"{_money(cost)}{mark} |"
        )
    if not users:
        lines.append("| (no requests in these days) | | | | |")
    lines += ["", f"## Top {TOP_TOOLS} tools", "", "| tool | kind | calls | errors | error rate |"]
    lines.append("|---|---|---:|---:|---:|")
    for name, kind, calls, errors in tools:
        lines.append(f"| {name} | {kind} | {calls:,} | {errors:,} | {errors / calls:.1%} |")
    if not tools:
        lines.append("| (no tool calls in these days) | | | | |")
    return "\n".join(lines) + "\n"


SUMMARIES: dict[str, Callable[[duckdb.DuckDBPyConnection], str]] = {"usage": usage_summary}


def usage_run_totals(con: duckdb.DuckDBPyConnection, sessions: list[str]) -> dict[str, Any]:
    """What the sessions a run read add up to: requests, tokens and cost at today's prices
    (a session that grew counts whole), and how many requests have no price."""
    row = con.execute(
        """
        SELECT count(*), sum(input_tokens), sum(output_tokens),
               sum(cache_creation_input_tokens), sum(cache_read_input_tokens),
               sum(cost_usd), count(*) FILTER (WHERE cost_usd IS NULL)
        FROM usage_requests WHERE session_file IN (SELECT UNNEST($1::VARCHAR[]))
        """,
        [sessions],
    ).fetchone()
    names = (
        "requests",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "cost_usd",
        "unpriced_requests",
    )
    values = row or (0,) * len(names)
    totals = {name: (value or 0) for name, value in zip(names, values, strict=True)}
    totals["cost_usd"] = round(float(totals["cost_usd"]), 6)
    return totals


RUN_TOTALS: dict[str, Callable[[duckdb.DuckDBPyConnection, list[str]], dict[str, Any]]] = {
    "usage": usage_run_totals
}


def totals_line(processor: str, totals: dict[str, Any]) -> str:
    """The totals for people: `usage: 7 sessions read: 52 requests, 12,345 input … $0.57`."""
    parts = [f"{totals.get('requests', 0):,} requests"]
    for name, label in (
        ("input_tokens", "input"),
        ("output_tokens", "output"),
        ("cache_creation_input_tokens", "cache write"),
        ("cache_read_input_tokens", "cache read"),
    ):
        parts.append(f"{totals.get(name, 0):,} {label}")
    cost = f"${totals.get('cost_usd', 0):,.2f}"
    if totals.get("unpriced_requests"):
        cost += f" ({totals['unpriced_requests']:,} requests unpriced: a partial cost)"
    return f"{processor}, sessions read: " + ", ".join(parts) + f"; cost {cost}"
