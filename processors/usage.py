"""Usage processor: tool, skill, subagent, MCP and slash-command events, deduplicated API
requests with token counts and estimated cost, and one summary row per session file.

Real transcripts stream one line per content block and repeat `message.id`/`requestId` on
each of them (the old system summed tokens per line and dropped tool calls by keeping one line
per message). Here requests are keyed on `(message.id, requestId)` keeping the most complete
line, and tool calls are the union of all blocks deduplicated by `tool_use.id`. Everything is
one streaming pass; per-request and per-tool-call state is held in dicts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import orjson

from processors.base import ProcessResult, Table
from processors.pricing import cost_usd
from processors.session import Session

SYNTHETIC_MODEL = "<synthetic>"
IDLE_GAP_SECONDS = 300.0
META_MAX_BYTES = 1 << 20
MAX_BIGINT = (1 << 63) - 1

SUBAGENT_TOOLS = frozenset({"Task", "Agent"})
_COMMAND_NAME = re.compile(r"<command-name>\s*(.*?)\s*</command-name>", re.DOTALL)
_COMMAND_ARGS = re.compile(r"<command-args>(.*?)</command-args>", re.DOTALL)
# Blocks a person can send; a turn made only of tool results (or unknown blocks) is not theirs.
_HUMAN_BLOCKS = frozenset({"text", "image", "document"})
# Output of a local command (/cost, /model …) echoed into the transcript: not a human turn.
_LOCAL_COMMAND_OUTPUT = ("<local-command-stdout>", "<local-command-stderr>")

USAGE_EVENTS = Table(
    name="usage_events",
    columns=(
        ("session_file", "VARCHAR"),
        ("username", "VARCHAR"),
        ("session_id", "VARCHAR"),
        ("agent_id", "VARCHAR"),
        ("is_sidechain", "BOOLEAN"),
        ("event_type", "VARCHAR"),
        ("tool_name", "VARCHAR"),
        ("skill_name", "VARCHAR"),
        ("subagent_type", "VARCHAR"),
        ("mcp_server", "VARCHAR"),
        ("mcp_tool", "VARCHAR"),
        ("mcp_plugin", "VARCHAR"),
        ("command_name", "VARCHAR"),
        ("command_args", "VARCHAR"),
        ("tool_use_id", "VARCHAR"),
        ("is_error", "BOOLEAN"),
        ("model", "VARCHAR"),
        ("cwd", "VARCHAR"),
        ("git_branch", "VARCHAR"),
        ("message_id", "VARCHAR"),
        ("request_id", "VARCHAR"),
        ("occurred_at", "TIMESTAMPTZ"),
    ),
)

USAGE_REQUESTS = Table(
    name="usage_requests",
    columns=(
        ("session_file", "VARCHAR"),
        ("username", "VARCHAR"),
        ("session_id", "VARCHAR"),
        ("message_id", "VARCHAR"),
        ("request_id", "VARCHAR"),
        ("model", "VARCHAR"),
        ("input_tokens", "BIGINT"),
        ("output_tokens", "BIGINT"),
        ("cache_creation_input_tokens", "BIGINT"),
        ("cache_read_input_tokens", "BIGINT"),
        ("cache_creation_5m_input_tokens", "BIGINT"),
        ("cache_creation_1h_input_tokens", "BIGINT"),
        ("cost_usd", "DOUBLE"),
        ("stop_reason", "VARCHAR"),
        ("service_tier", "VARCHAR"),
        ("is_sidechain", "BOOLEAN"),
        ("agent_id", "VARCHAR"),
        ("occurred_at", "TIMESTAMPTZ"),
    ),
)

USAGE_SESSIONS = Table(
    name="usage_sessions",
    columns=(
        ("session_file", "VARCHAR"),
        ("username", "VARCHAR"),
        ("session_id", "VARCHAR"),
        ("agent_id", "VARCHAR"),
        ("is_subagent", "BOOLEAN"),
        ("agent_type", "VARCHAR"),
        ("started_at", "TIMESTAMPTZ"),
        ("ended_at", "TIMESTAMPTZ"),
        ("active_seconds", "DOUBLE"),
        ("user_messages", "INTEGER"),
        ("assistant_messages", "INTEGER"),
        ("lines", "BIGINT"),
        ("malformed_lines", "BIGINT"),
        ("tool_calls", "INTEGER"),
        ("tool_errors", "INTEGER"),
        ("skill_calls", "INTEGER"),
        ("subagent_calls", "INTEGER"),
        ("mcp_calls", "INTEGER"),
        ("slash_commands", "INTEGER"),
        ("distinct_tools", "INTEGER"),
        ("distinct_skills", "INTEGER"),
        ("primary_model", "VARCHAR"),
        ("input_tokens", "BIGINT"),
        ("output_tokens", "BIGINT"),
        ("cache_creation_input_tokens", "BIGINT"),
        ("cache_read_input_tokens", "BIGINT"),
        ("cost_usd", "DOUBLE"),
        ("cwd", "VARCHAR"),
        ("git_branch", "VARCHAR"),
        ("claude_version", "VARCHAR"),
    ),
)

_REQUEST_COLUMNS = ", ".join(USAGE_REQUESTS.column_names)

# Resumed sessions copy earlier lines into a new file, so one request can sit in two files.
# Plain window-function SQL (no QUALIFY / EXCLUDE) so it also runs on PostgreSQL.
USAGE_REQUESTS_UNIQUE_VIEW = f"""CREATE OR REPLACE VIEW usage_requests_unique AS
SELECT {_REQUEST_COLUMNS}
FROM (
    SELECT {_REQUEST_COLUMNS},
        row_number() OVER (
            PARTITION BY message_id, request_id
            ORDER BY
                CASE WHEN stop_reason IS NULL THEN 1 ELSE 0 END,
                output_tokens DESC NULLS LAST,
                session_file
        ) AS copy_rank
    FROM usage_requests
) ranked
WHERE copy_rank = 1"""


# --- tolerant field access: real lines can carry any type anywhere ---------------------------


def _str(value: object) -> str | None:
    """A non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    """A non-negative token count from an int, integral float or digit string, else None."""
    number: int | None = None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value.strip())
    return number if number is not None and 0 <= number <= MAX_BIGINT else None


def _dict(value: object) -> Mapping[str, Any]:
    """The value when it is an object, else an empty one, so `.get` chains never raise."""
    return value if isinstance(value, dict) else {}


def _timestamp(value: object) -> datetime | None:
    """An aware datetime from an ISO-8601 string (naive means UTC), else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _iso(value: datetime | None) -> str | None:
    """ISO-8601 text that DuckDB casts to TIMESTAMPTZ whatever the input's spelling was."""
    return value.isoformat() if value is not None else None


def _blocks(content: object) -> Iterable[Mapping[str, Any]]:
    """The dict blocks of a content list (strings, numbers and None yield nothing)."""
    if isinstance(content, list):
        return (block for block in content if isinstance(block, dict))
    return ()


def _block_type(block: Mapping[str, Any]) -> str | None:
    """A block's `type`, only when it is a string (a list there would not even hash)."""
    return _str(block.get("type"))


def _texts(content: object) -> Iterable[str]:
    """The human text of a user message: the string itself or its `text` blocks."""
    if isinstance(content, str):
        yield content
        return
    for block in _blocks(content):
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            yield block["text"]


# --- classification ------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolKind:
    """How one tool_use block is counted."""

    event_type: str
    skill_name: str | None = None
    subagent_type: str | None = None
    mcp_server: str | None = None
    mcp_tool: str | None = None
    mcp_plugin: str | None = None


def classify_tool(name: str, tool_input: object) -> ToolKind:
    """Skill / subagent / MCP / plain tool, with the name that matters for each."""
    args = _dict(tool_input)
    if name == "Skill":
        return ToolKind("skill", skill_name=_str(args.get("skill")) or _str(args.get("name")))
    if name in SUBAGENT_TOOLS:
        return ToolKind("subagent", subagent_type=_str(args.get("subagent_type")))
    if name.startswith("mcp__"):
        server, _, tool = name[len("mcp__") :].partition("__")
        plugin: str | None = None
        if server.startswith("plugin_"):
            plugin_name, _, plugin_server = server[len("plugin_") :].partition("_")
            plugin = plugin_name or None
            server = plugin_server or plugin_name
        return ToolKind("mcp", mcp_server=server or None, mcp_tool=tool or None, mcp_plugin=plugin)
    return ToolKind("tool")


def slash_command(content: object) -> tuple[str, str | None] | None:
    """(command name without `/`, args or None) when a user message is a typed slash command."""
    for text in _texts(content):
        match = _COMMAND_NAME.search(text)
        if match is None:
            continue
        name = match.group(1).strip().lstrip("/").strip()
        if not name:
            continue
        args_match = _COMMAND_ARGS.search(text)
        args = args_match.group(1).strip() if args_match else ""
        return name, args or None
    return None


def _may_be_typed(line: Mapping[str, Any]) -> bool:
    """Subagent prompts and compaction summaries are written by the model, even when they
    quote a `<command-name>` tag."""
    return line.get("isSidechain") is not True and line.get("isCompactSummary") is not True


def _is_human_turn(line: Mapping[str, Any], content: object) -> bool:
    """A turn the person typed: not meta, not a subagent prompt, not a compaction summary,
    not only tool results, not echoed local-command output."""
    if line.get("isMeta") is True or not _may_be_typed(line):
        return False
    if isinstance(content, str):
        text = content.strip()
        return bool(text) and not text.startswith(_LOCAL_COMMAND_OUTPUT)
    return any(_block_type(block) in _HUMAN_BLOCKS for block in _blocks(content))


# --- per-file accumulation -----------------------------------------------------------------


@dataclass
class _Request:
    """The most complete line seen so far for one API request."""

    row: dict[str, Any]
    score: tuple[bool, int]
    # (input, output, cache write 5m, cache write 1h, cache read) to price once at the end;
    # None when the line had no usage object at all (unknown tokens: no cost, not zero).
    priced_tokens: tuple[int, int, int, int, int] | None


@dataclass
class _Accumulator:
    """Everything gathered during the single pass over one file."""

    session: Session
    lines: int = 0
    timestamps: list[float] = field(default_factory=list)
    started: datetime | None = None
    ended: datetime | None = None
    user_messages: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    tool_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    tool_results: dict[str, bool] = field(default_factory=dict)
    requests: dict[tuple[str | None, str | None], _Request] = field(default_factory=dict)
    line_session_id: str | None = None
    cwd: str | None = None
    git_branch: str | None = None
    claude_version: str | None = None

    def common(self, line: Mapping[str, Any]) -> dict[str, Any]:
        """Columns every row of a line shares."""
        return {
            "session_file": self.session.key,
            "username": self.session.username,
            "session_id": _str(line.get("sessionId")) or self.session.session_id,
            "agent_id": _str(line.get("agentId")) or self.session.agent_id,
            "is_sidechain": line.get("isSidechain") is True,
        }

    def see_line(self, line: Mapping[str, Any]) -> datetime | None:
        """Count a line and record its time and workspace context."""
        self.lines += 1
        self.line_session_id = self.line_session_id or _str(line.get("sessionId"))
        self.cwd = self.cwd or _str(line.get("cwd"))
        self.git_branch = _str(line.get("gitBranch")) or self.git_branch
        self.claude_version = _str(line.get("version")) or self.claude_version
        ts = _timestamp(line.get("timestamp"))
        if ts is not None:
            self.timestamps.append(ts.timestamp())
            self.started = ts if self.started is None or ts < self.started else self.started
            self.ended = ts if self.ended is None or ts > self.ended else self.ended
        return ts

    def add_user(self, line: Mapping[str, Any], ts: datetime | None) -> None:
        """Tool outcomes, human turns and typed slash commands from a user line."""
        message = line.get("message")
        if not isinstance(message, dict):
            return
        content = message.get("content")
        for block in _blocks(content):
            if block.get("type") != "tool_result":
                continue
            tool_use_id = _str(block.get("tool_use_id"))
            if tool_use_id is not None:
                failed = block.get("is_error") is True
                self.tool_results[tool_use_id] = self.tool_results.get(tool_use_id, False) or failed
        if _is_human_turn(line, content):
            self.user_messages += 1
        command = slash_command(content) if _may_be_typed(line) else None
        if command is not None:
            name, args = command
            self.events.append(
                {
                    **self.common(line),
                    "event_type": "slash_command",
                    "command_name": name,
                    "command_args": args,
                    "cwd": _str(line.get("cwd")),
                    "git_branch": _str(line.get("gitBranch")),
                    "occurred_at": _iso(ts),
                }
            )

    def add_assistant(self, line: Mapping[str, Any], ts: datetime | None) -> None:
        """Tool calls and the API request from one streamed line of a response."""
        message = line.get("message")
        if not isinstance(message, dict):
            return
        model = _str(message.get("model"))
        if model == SYNTHETIC_MODEL or line.get("isApiErrorMessage") is True:
            return  # a client-side API error notice, not a request
        message_id = _str(message.get("id"))
        request_id = _str(line.get("requestId"))
        common = self.common(line)
        for block in _blocks(message.get("content")):
            if block.get("type") == "tool_use":
                self._add_tool_use(block, common, line, model, message_id, request_id, ts)
        if message_id is not None or request_id is not None:
            self._add_request((message_id, request_id), message, common, model, ts)

    def _add_tool_use(
        self,
        block: Mapping[str, Any],
        common: dict[str, Any],
        line: Mapping[str, Any],
        model: str | None,
        message_id: str | None,
        request_id: str | None,
        ts: datetime | None,
    ) -> None:
        name = _str(block.get("name"))
        if name is None:
            return
        tool_use_id = _str(block.get("id"))
        if tool_use_id is not None and tool_use_id in self.tool_events:
            return  # the same block repeated on another streamed line of the response
        kind = classify_tool(name, block.get("input"))
        event = {
            **common,
            "event_type": kind.event_type,
            "tool_name": name,
            "skill_name": kind.skill_name,
            "subagent_type": kind.subagent_type,
            "mcp_server": kind.mcp_server,
            "mcp_tool": kind.mcp_tool,
            "mcp_plugin": kind.mcp_plugin,
            "tool_use_id": tool_use_id,
            "model": model,
            "cwd": _str(line.get("cwd")),
            "git_branch": _str(line.get("gitBranch")),
            "message_id": message_id,
            "request_id": request_id,
            "occurred_at": _iso(ts),
        }
        self.events.append(event)
        if tool_use_id is not None:
            self.tool_events[tool_use_id] = event

    def _add_request(
        self,
        key: tuple[str | None, str | None],
        message: Mapping[str, Any],
        common: dict[str, Any],
        model: str | None,
        ts: datetime | None,
    ) -> None:
        raw_usage = message.get("usage")
        usage = _dict(raw_usage)
        input_tokens = _int(usage.get("input_tokens"))
        output_tokens = _int(usage.get("output_tokens"))
        cache_write = _int(usage.get("cache_creation_input_tokens"))
        cache_read = _int(usage.get("cache_read_input_tokens"))
        split = _dict(usage.get("cache_creation"))
        write_5m = _int(split.get("ephemeral_5m_input_tokens"))
        write_1h = _int(split.get("ephemeral_1h_input_tokens"))
        has_split = write_5m is not None or write_1h is not None
        if has_split and cache_write is None:
            cache_write = (write_5m or 0) + (write_1h or 0)
        stop_reason = _str(message.get("stop_reason"))
        total = sum(n or 0 for n in (input_tokens, output_tokens, cache_write, cache_read))
        score = (stop_reason is not None, total)

        previous = self.requests.get(key)
        if previous is not None and score < previous.score:
            # Keep the complete line's figures, but not its blank fields.
            previous.row["model"] = previous.row["model"] or model
            return
        priced_tokens: tuple[int, int, int, int, int] | None = None
        if isinstance(raw_usage, dict):
            # Without the 5m/1h split every cache write is priced at the 5m rate.
            priced_5m = (write_5m or 0) if has_split else (cache_write or 0)
            priced_tokens = (
                input_tokens or 0,
                output_tokens or 0,
                priced_5m,
                write_1h or 0,
                cache_read or 0,
            )
        first_seen = previous.row["occurred_at"] if previous is not None else None
        row = {
            "session_file": common["session_file"],
            "username": common["username"],
            "session_id": common["session_id"],
            "message_id": key[0],
            "request_id": key[1],
            "model": model or (previous.row["model"] if previous is not None else None),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
            "cache_creation_5m_input_tokens": write_5m if has_split else None,
            "cache_creation_1h_input_tokens": write_1h if has_split else None,
            "cost_usd": None,
            "stop_reason": stop_reason,
            "service_tier": _str(usage.get("service_tier")),
            "is_sidechain": common["is_sidechain"],
            "agent_id": common["agent_id"],
            "occurred_at": first_seen or _iso(ts),
        }
        self.requests[key] = _Request(row=row, score=score, priced_tokens=priced_tokens)

    def active_seconds(self) -> float:
        """Time between consecutive activity, leaving out idle gaps longer than 5 minutes."""
        ordered = sorted(self.timestamps)
        return float(
            sum(
                gap
                for earlier, later in pairwise(ordered)
                if (gap := later - earlier) <= IDLE_GAP_SECONDS
            )
        )

    def result(self) -> ProcessResult:
        for tool_use_id, event in self.tool_events.items():
            event["is_error"] = self.tool_results.get(tool_use_id)
        for request in self.requests.values():
            if request.priced_tokens is not None:
                request.row["cost_usd"] = cost_usd(request.row["model"], *request.priced_tokens)
        requests = [request.row for request in self.requests.values()]
        summary = self.summary(requests)
        return ProcessResult(
            rows={
                USAGE_EVENTS.name: _complete(USAGE_EVENTS, self.events),
                USAGE_REQUESTS.name: _complete(USAGE_REQUESTS, requests),
                USAGE_SESSIONS.name: _complete(USAGE_SESSIONS, [summary]),
            },
            items=len(self.events) + len(requests),
        )

    def summary(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        session = self.session
        tool_calls = [e for e in self.events if e["event_type"] != "slash_command"]
        by_type = Counter(e["event_type"] for e in self.events)
        models = Counter(r["model"] for r in requests if r["model"] is not None)
        costs = [r["cost_usd"] for r in requests if r["cost_usd"] is not None]

        def total(column: str) -> int:
            return sum(r[column] or 0 for r in requests)

        return {
            "session_file": session.key,
            "username": session.username,
            "session_id": session.session_id or self.line_session_id,
            "agent_id": session.agent_id,
            "is_subagent": session.is_subagent,
            "agent_type": read_agent_type(session),
            "started_at": _iso(self.started),
            "ended_at": _iso(self.ended),
            "active_seconds": self.active_seconds(),
            "user_messages": self.user_messages,
            "assistant_messages": len(requests),
            "lines": self.lines,
            "malformed_lines": session.malformed_lines,
            "tool_calls": len(tool_calls),
            "tool_errors": sum(1 for e in tool_calls if e.get("is_error") is True),
            "skill_calls": by_type["skill"],
            "subagent_calls": by_type["subagent"],
            "mcp_calls": by_type["mcp"],
            "slash_commands": by_type["slash_command"],
            "distinct_tools": len({e["tool_name"] for e in tool_calls}),
            "distinct_skills": len({e["skill_name"] for e in tool_calls if e.get("skill_name")}),
            "primary_model": models.most_common(1)[0][0] if models else None,
            "input_tokens": total("input_tokens"),
            "output_tokens": total("output_tokens"),
            "cache_creation_input_tokens": total("cache_creation_input_tokens"),
            "cache_read_input_tokens": total("cache_read_input_tokens"),
            "cost_usd": sum(costs) if costs else None,
            "cwd": self.cwd,
            "git_branch": self.git_branch,
            "claude_version": self.claude_version,
        }


def _complete(table: Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with every column present, in table order, so any insert path sees one shape."""
    names = table.column_names
    return [{name: row.get(name) for name in names} for row in rows]


def read_agent_type(session: Session) -> str | None:
    """`agentType` from the `agent-<id>.meta.json` beside a subagent transcript; None when the
    file is absent, oversized or not the expected shape."""
    if session.agent_id is None:
        return None
    meta_path = session.path.with_name(f"agent-{session.agent_id}.meta.json")
    try:
        if meta_path.stat().st_size > META_MAX_BYTES:
            return None
        meta = orjson.loads(meta_path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return _str(meta.get("agentType")) if isinstance(meta, dict) else None


class UsageProcessor:
    """Turns one transcript into usage events, deduplicated requests and a session summary."""

    name = "usage"
    version = "1"
    cadence_seconds = 600
    tables: tuple[Table, ...] = (USAGE_EVENTS, USAGE_REQUESTS, USAGE_SESSIONS)
    views: tuple[str, ...] = (USAGE_REQUESTS_UNIQUE_VIEW,)

    def process(self, session: Session) -> ProcessResult:
        acc = _Accumulator(session)
        for line in session.lines():
            ts = acc.see_line(line)
            line_type = line.get("type")
            if line_type == "user":
                acc.add_user(line, ts)
            elif line_type == "assistant":
                acc.add_assistant(line, ts)
        return acc.result()
