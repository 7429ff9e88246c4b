"""Usage processor: tool, skill, subagent, MCP and slash-command events, deduplicated API
requests with token counts and estimated cost, and one summary row per session file.

Real transcripts stream one line per content block and repeat `message.id`/`requestId` on
each of them (the old system summed tokens per line and dropped tool calls by keeping one line
per message). Here requests are keyed on `(message.id, requestId)` keeping the most complete
line, and tool calls are the union of all blocks deduplicated by `tool_use.id`. Everything is
one streaming pass over a resumable state whose checkpoint is plain JSON: Claude Code only
appends, so a later read continues from the checkpoint with only the new lines and returns
only the rows those lines added or changed.
"""

from __future__ import annotations

import base64
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import msgspec
import orjson

from processors.base import ColumnRows, Increment, ProcessResult, Table, WholeReadNeeded
from processors.pricing import PRICE_OVERRIDES_DDL, PRICES_VIEW, cost_sql, price_model
from processors.session import Session
from processors.transcript import tag_text
from processors.usage_reports import COPIES_DDL, NOT_A_LOSING_COPY, REPORT_VIEWS

SYNTHETIC_MODEL = "<synthetic>"
IDLE_GAP_SECONDS = 300.0
META_MAX_BYTES = 1 << 20
MAX_BIGINT = (1 << 63) - 1

SUBAGENT_TOOLS = frozenset({"Task", "Agent"})
# Blocks a person can send; a turn made only of tool results (or unknown blocks) is not theirs.
_HUMAN_BLOCKS = frozenset({"text", "image", "document"})
# Output of a local command (/cost, /model …) echoed into the transcript: not a human turn.
_LOCAL_COMMAND_OUTPUT = ("<local-command-stdout>", "<local-command-stderr>")

USAGE_EVENTS = Table(
    name="usage_events",
    columns=(
        ("session_file", "VARCHAR"),
        # tool_use_id for tool calls, the line's uuid for slash commands; `line:<n>…` (the
        # n-th JSON line of the file) when those are missing or taken. Unique per file.
        ("event_id", "VARCHAR"),
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
    key=("event_id",),
)

# Requests and session summaries are stored without costs (`…_raw`); the views of the same
# names without `_raw` price them at query time (see processors/pricing.py), so a price change
# reprocesses nothing.
USAGE_REQUESTS = Table(
    name="usage_requests_raw",
    columns=(
        ("session_file", "VARCHAR"),
        ("username", "VARCHAR"),
        ("session_id", "VARCHAR"),
        ("message_id", "VARCHAR"),
        ("request_id", "VARCHAR"),
        ("model", "VARCHAR"),
        ("price_model", "VARCHAR"),  # the model id its price is looked up by
        ("input_tokens", "BIGINT"),
        ("output_tokens", "BIGINT"),
        ("cache_creation_input_tokens", "BIGINT"),
        ("cache_read_input_tokens", "BIGINT"),
        ("cache_creation_5m_input_tokens", "BIGINT"),
        ("cache_creation_1h_input_tokens", "BIGINT"),
        ("stop_reason", "VARCHAR"),
        ("service_tier", "VARCHAR"),
        ("is_sidechain", "BOOLEAN"),
        ("agent_id", "VARCHAR"),
        ("occurred_at", "TIMESTAMPTZ"),
    ),
    key=("message_id", "request_id"),  # request_id may be NULL: compared IS NOT DISTINCT FROM
)

USAGE_SESSIONS = Table(
    name="usage_sessions_raw",
    columns=(
        ("session_file", "VARCHAR"),
        ("username", "VARCHAR"),
        ("session_id", "VARCHAR"),
        ("agent_id", "VARCHAR"),
        ("workflow_id", "VARCHAR"),  # `<session>/subagents/workflows/<workflow_id>/…`
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
        ("cwd", "VARCHAR"),
        ("git_branch", "VARCHAR"),
        ("claude_version", "VARCHAR"),
    ),
    key=(),  # one row per file, recomputed and replaced whole by every increment
)


def _after(columns: tuple[str, ...], anchor: str, *added: str) -> list[str]:
    """`columns` with `added` inserted after `anchor`."""
    at = columns.index(anchor) + 1
    return [*columns[:at], *added, *columns[at:]]


_PRICED_REQUEST_COLUMNS = _after(
    USAGE_REQUESTS.column_names, "cache_creation_1h_input_tokens", "cost_usd"
)
_REQUEST_COLUMNS = ", ".join(_PRICED_REQUEST_COLUMNS)

# Each request with its cost at today's prices (NULL: no price for its model, or no tokens).
USAGE_REQUESTS_VIEW = f"""CREATE OR REPLACE VIEW usage_requests AS
SELECT {", ".join(c if c == "cost_usd" else f"r.{c}" for c in _PRICED_REQUEST_COLUMNS)}
FROM (
    SELECT r.*, {cost_sql("r", "p")} AS cost_usd
    FROM usage_requests_raw r LEFT JOIN usage_prices p ON p.model = r.price_model
) r"""

# A file's summary with the cost of its requests: a sum of the priced ones, and how many are
# not priced (a partial cost says so).
USAGE_SESSIONS_VIEW = f"""CREATE OR REPLACE VIEW usage_sessions AS
SELECT {", ".join(f"s.{c}" for c in USAGE_SESSIONS.column_names[:-3])},
    c.cost_usd, coalesce(c.unpriced_requests, 0) AS unpriced_requests,
    {", ".join(f"s.{c}" for c in USAGE_SESSIONS.column_names[-3:])}
FROM usage_sessions_raw s
LEFT JOIN (
    SELECT session_file, sum(cost_usd) AS cost_usd,
        count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced_requests
    FROM usage_requests GROUP BY session_file
) c ON c.session_file = s.session_file"""

# Resumed sessions copy earlier lines into a new file, so one request can sit in two files.
# SQL both DuckDB and PostgreSQL run (NOT EXISTS, not DuckDB's ANTI JOIN).
# (The copies not kept are listed as rows are written, in usage_request_copies: the first by
# stop_reason, then output tokens, then file; see flows/request_copies.py.)
USAGE_REQUESTS_UNIQUE_VIEW = f"""CREATE OR REPLACE VIEW usage_requests_unique AS
SELECT {", ".join(f"r.{c}" for c in _PRICED_REQUEST_COLUMNS)}
FROM usage_requests r
WHERE {NOT_A_LOSING_COPY}"""


# --- the lines, as usage reads them -----------------------------------------------------------
#
# Only the fields usage reads are declared: the rest of a line (tool results, file contents,
# thinking) is skipped by the decoder, never made into Python objects. Real lines can carry any
# type anywhere, and such a line is still a line (counted, its other fields read): so a field is
# `Any`, or a union of a shape and every other JSON type, and never fails to decode.


class _Object(msgspec.Struct, gc=False):
    """Any JSON object whose fields usage does not read."""


# Every JSON type but an object: with a shape of its own, a union that takes any value.
_Other = str | int | float | bool | list[Any] | None


class ToolInput(msgspec.Struct, gc=False):
    skill: Any = None
    name: Any = None
    subagent_type: Any = None


class Block(msgspec.Struct, gc=False):
    """A content block: `tool_use`, `tool_result`, `text`, … (its content is skipped)."""

    type: Any = None
    id: Any = None
    name: Any = None
    input: ToolInput | _Other = None
    tool_use_id: Any = None
    is_error: Any = None
    text: Any = None


class CacheCreation(msgspec.Struct, gc=False):
    ephemeral_5m_input_tokens: Any = None
    ephemeral_1h_input_tokens: Any = None


class TokenUsage(msgspec.Struct, gc=False):
    input_tokens: Any = None
    output_tokens: Any = None
    cache_creation_input_tokens: Any = None
    cache_read_input_tokens: Any = None
    cache_creation: CacheCreation | _Other = None
    service_tier: Any = None


class Message(msgspec.Struct, gc=False):
    id: Any = None
    model: Any = None
    stop_reason: Any = None
    usage: TokenUsage | _Other = None
    content: list[Block | _Other] | _Object | str | int | float | bool | None = None


class Line(msgspec.Struct, gc=False):
    """One transcript line, as far as usage reads it."""

    type: Any = None
    timestamp: Any = None
    sessionId: Any = None
    agentId: Any = None
    isSidechain: Any = None
    isMeta: Any = None
    isCompactSummary: Any = None
    isApiErrorMessage: Any = None
    cwd: Any = None
    gitBranch: Any = None
    version: Any = None
    uuid: Any = None
    requestId: Any = None
    message: Message | _Other = None


# --- tolerant field access: real lines can carry any type anywhere ---------------------------


def _str(value: object) -> str | None:
    """A non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    """A non-negative token count from an int, integral float or digit string, else None."""
    # (Decoded JSON: `type(...) is` leaves out booleans, the only int subclass it holds.)
    if type(value) is float and value.is_integer():
        value = int(value)
    elif type(value) is str and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    return value if type(value) is int and 0 <= value <= MAX_BIGINT else None


def _timestamp(value: object) -> datetime | None:
    """An aware UTC datetime from an ISO-8601 string (naive means UTC), else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        if parsed.tzinfo is UTC:  # `Z` and `+00:00`, nearly every line: nothing to convert
            return parsed
        return parsed.astimezone(UTC)  # OverflowError when that leaves the datetime range
    except (ValueError, OverflowError):
        return None


def _blocks(content: object) -> list[Block]:
    """The object blocks of a content list (strings, numbers and None yield nothing)."""
    if isinstance(content, list):
        return [block for block in content if isinstance(block, Block)]
    return []


def _texts(content: object) -> Iterable[str]:
    """The human text of a user message: the string itself or its `text` blocks."""
    if isinstance(content, str):
        yield content
        return
    for block in _blocks(content):
        if block.type == "text" and isinstance(block.text, str):
            yield block.text


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


_PLAIN_TOOL = ToolKind("tool")
_price_model = lru_cache(maxsize=1024)(price_model)  # (a session names a few models, often)
_NO_INPUT = ToolInput()
_NO_USAGE = TokenUsage()


def classify_tool(name: str, tool_input: object) -> ToolKind:
    """Skill / subagent / MCP / plain tool, with the name that matters for each."""
    args = tool_input if isinstance(tool_input, ToolInput) else _NO_INPUT
    if name == "Skill":
        return ToolKind("skill", skill_name=_str(args.skill) or _str(args.name))
    if name in SUBAGENT_TOOLS:
        return ToolKind("subagent", subagent_type=_str(args.subagent_type))
    if name.startswith("mcp__"):
        return _mcp_kind(name)
    return _PLAIN_TOOL  # (kinds are frozen: one instance serves every plain call)


@lru_cache(maxsize=1024)
def _mcp_kind(name: str) -> ToolKind:
    """Server, tool and plugin of an `mcp__…` name (cached: a session calls a few, often)."""
    server, _, tool = name[len("mcp__") :].partition("__")
    plugin: str | None = None
    if server.startswith("plugin_"):
        plugin_name, _, plugin_server = server[len("plugin_") :].partition("_")
        plugin = plugin_name or None
        server = plugin_server or plugin_name
    return ToolKind("mcp", mcp_server=server or None, mcp_tool=tool or None, mcp_plugin=plugin)


def slash_command(content: object) -> tuple[str, str | None] | None:
    """(command name without `/`, args or None) when a user message is a typed slash command."""
    for text in _texts(content):
        name = tag_text(text, "command-name")
        if name is None:
            continue
        name = name.strip().lstrip("/").strip()
        if not name:
            continue
        args = (tag_text(text, "command-args") or "").strip()
        return name, args or None
    return None


def _may_be_typed(line: Line) -> bool:
    """Subagent prompts and compaction summaries are written by the model, even when they
    quote a `<command-name>` tag."""
    return line.isSidechain is not True and line.isCompactSummary is not True


def _is_human_turn(line: Line, content: object) -> bool:
    """A turn the person typed: not meta, not a subagent prompt, not a compaction summary,
    not only tool results, not echoed local-command output."""
    if line.isMeta is True or not _may_be_typed(line):
        return False
    if isinstance(content, str):
        text = content.strip()
        return bool(text) and not text.startswith(_LOCAL_COMMAND_OUTPUT)
    return any(_str(block.type) in _HUMAN_BLOCKS for block in _blocks(content))


# --- resumable per-file state ----------------------------------------------------------------
#
# A checkpoint does not grow with the file. It keeps the recent entries (the last KEEP_EVENTS
# tool calls and KEEP_REQUESTS requests: what new lines touch in practice, a response streamed
# across the boundary, a tool result for a recent call), the summary's running totals, and a
# 64-bit digest of every key ever seen. New lines that touch an older entry (a digest hit) make
# the read raise WholeReadNeeded and the pipeline reads the file whole, which is always right;
# so a digest collision costs a whole read, never a wrong row. A 50 MB transcript's checkpoint
# is ~0.3 MB instead of ~3 MB, and a 500 MB one can be read in segments with bounded memory.
#
# Entries are kept in the shape of the checkpoint, so handing it over costs nothing and loading
# it only rebuilds a few indexes. Events and requests are lists of column values in table order
# (without session_file and username, which come from the path); every VARCHAR value is an
# index into `strings` (ids, models and paths repeat across rows) and every TIMESTAMPTZ value is
# integer microseconds since the epoch. Entries are never changed in place but replaced, so the
# checkpoint handed in stays as it was (a retry can reuse it) for the price of copying a few
# lists, not every entry.

CHECKPOINT_FORMAT = 3
KEEP_EVENTS = 512
KEEP_REQUESTS = 128
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)
_IDLE_GAP_MICROS = round(IDLE_GAP_SECONDS * 1_000_000)
_PER_FILE = frozenset({"session_file", "username"})
_STRING, _TIME, _PLAIN = "s", "t", "v"
_SLASH = "slash_command"


@dataclass(frozen=True)
class _Layout:
    """Which columns an entry stores, in order, and how each value is packed."""

    table: Table
    fields: tuple[str, ...]
    packing: tuple[tuple[str, bool], ...]  # (name, is a VARCHAR) per stored column
    strings: tuple[tuple[int, str], ...]  # (position, name) of the VARCHAR columns
    times: tuple[tuple[int, str], ...]  # … and of the TIMESTAMPTZ ones

    @classmethod
    def of(cls, table: Table) -> _Layout:
        packing = {"VARCHAR": _STRING, "TIMESTAMPTZ": _TIME}
        stored = [
            (name, packing.get(sql_type, _PLAIN))
            for name, sql_type in zip(table.column_names, table.value_types, strict=True)
            if name not in _PER_FILE
        ]
        return cls(
            table,
            tuple(n for n, _ in stored),
            tuple((n, k == _STRING) for n, k in stored),
            tuple((i, n) for i, (n, k) in enumerate(stored) if k == _STRING),
            tuple((i, n) for i, (n, k) in enumerate(stored) if k == _TIME),
        )

    def at(self, name: str) -> int:
        return self.fields.index(name)


_EVENTS = _Layout.of(USAGE_EVENTS)
_E_EVENT_ID = _EVENTS.at("event_id")
_E_SESSION_ID = _EVENTS.at("session_id")
_E_AGENT_ID = _EVENTS.at("agent_id")
_E_SIDECHAIN = _EVENTS.at("is_sidechain")
_E_TYPE = _EVENTS.at("event_type")
_E_TOOL = _EVENTS.at("tool_name")
_E_SKILL = _EVENTS.at("skill_name")
_E_SUBAGENT = _EVENTS.at("subagent_type")
_E_MCP_SERVER = _EVENTS.at("mcp_server")
_E_MCP_TOOL = _EVENTS.at("mcp_tool")
_E_MCP_PLUGIN = _EVENTS.at("mcp_plugin")
_E_TOOL_USE_ID = _EVENTS.at("tool_use_id")
_E_IS_ERROR = _EVENTS.at("is_error")
_E_COMMAND = _EVENTS.at("command_name")
_E_ARGS = _EVENTS.at("command_args")
_E_MODEL = _EVENTS.at("model")
_E_CWD = _EVENTS.at("cwd")
_E_GIT_BRANCH = _EVENTS.at("git_branch")
_E_MESSAGE = _EVENTS.at("message_id")
_E_REQUEST = _EVENTS.at("request_id")
_E_AT = _EVENTS.at("occurred_at")

_REQUESTS = _Layout.of(USAGE_REQUESTS)
_R_SESSION_ID = _REQUESTS.at("session_id")
_R_AGENT_ID = _REQUESTS.at("agent_id")
_R_SIDECHAIN = _REQUESTS.at("is_sidechain")
_R_SERVICE_TIER = _REQUESTS.at("service_tier")
_R_MESSAGE = _REQUESTS.at("message_id")
_R_REQUEST = _REQUESTS.at("request_id")
_R_MODEL = _REQUESTS.at("model")
_R_PRICE_MODEL = _REQUESTS.at("price_model")
_R_INPUT = _REQUESTS.at("input_tokens")
_R_OUTPUT = _REQUESTS.at("output_tokens")
_R_CACHE_WRITE = _REQUESTS.at("cache_creation_input_tokens")
_R_CACHE_READ = _REQUESTS.at("cache_read_input_tokens")
_R_WRITE_5M = _REQUESTS.at("cache_creation_5m_input_tokens")
_R_WRITE_1H = _REQUESTS.at("cache_creation_1h_input_tokens")
_R_STOP = _REQUESTS.at("stop_reason")
_R_AT = _REQUESTS.at("occurred_at")
_SUMMED = (
    ("input_tokens", _R_INPUT),
    ("output_tokens", _R_OUTPUT),
    ("cache_creation_input_tokens", _R_CACHE_WRITE),
    ("cache_read_input_tokens", _R_CACHE_READ),
)


def _micros(value: datetime) -> int:
    """Exact integer microseconds: spans add up with no float drift, however they are split.
    (Plain integer arithmetic on the timedelta: dividing by a timedelta costs more.)"""
    since = value - _EPOCH
    return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds


def _iso_micros(value: int) -> str:
    """ISO-8601 text of microseconds since the epoch, which DuckDB casts to TIMESTAMPTZ (a
    naive datetime's text and the offset: half the time of formatting an aware one)."""
    return (_NAIVE_EPOCH + value * _MICROSECOND).isoformat() + "+00:00"


def _score(entry: list[Any]) -> tuple[bool, int]:
    """How complete a request's line is: a stop_reason first, then the most tokens."""
    return entry[_R_STOP] is not None, (
        (entry[_R_INPUT] or 0)
        + (entry[_R_OUTPUT] or 0)
        + (entry[_R_CACHE_WRITE] or 0)
        + (entry[_R_CACHE_READ] or 0)
    )


def _replace(
    entries: list[list[Any]], before: dict[int, list[Any] | None], index: int, entry: list[Any]
) -> None:
    """Put a new version of an entry in place, remembering the one before this read's first
    change (entries are never changed in place, so keeping the old list is enough)."""
    before.setdefault(index, entries[index])
    entries[index] = entry


def _changed(
    entries: list[list[Any]], before: dict[int, list[Any] | None], width: int
) -> list[int]:
    """The entries added, or whose columns (the first `width` values) differ from before."""
    return sorted(
        i for i, old in before.items() if old is None or old[:width] != entries[i][:width]
    )


def _digest(text: str) -> int:
    """A stable 64-bit digest of a key (crc32 and adler32 of its UTF-8: C speed, no salt)."""
    data = text.encode("utf-8", "surrogatepass")
    return (zlib.crc32(data) << 32) | zlib.adler32(data)


def _request_key(message_id: str | None, request_id: str | None) -> str:
    return f"r{message_id if message_id is not None else chr(30)}{chr(31)}{request_id}"


def _empty_totals() -> dict[str, Any]:
    """Running totals of every entry ever read: the summary row is made from these."""
    return {
        "events": 0,
        "requests": 0,
        "by_type": {},  # event_type -> events
        "tool_errors": 0,
        "tools": [],  # distinct tool names of tool calls, sorted
        "skills": [],  # distinct skill names, sorted
        "models": {},  # model -> [requests, ordinal of its first request]
        "tokens": [0, 0, 0, 0],  # in _SUMMED order
    }


def _empty_checkpoint() -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "lines": 0,  # JSON-object lines read: also the ordinal of the last one
        "malformed_lines": 0,
        "user_messages": 0,
        "session_id": None,  # the first sessionId on a line
        "cwd": None,  # the first cwd
        "git_branch": None,  # the last gitBranch
        "claude_version": None,  # the last version
        "agent_type": None,  # from the subagent meta file, read until found
        "spans": [],  # [first, last] µs of each run of timestamps with no idle gap, sorted
        "strings": [],
        "events": [],
        "requests": [],
        "results": {},  # tool_use_id -> failed, for results whose tool_use is not seen yet
        "seen": "",  # base64 of the 64-bit digests of every key read (little-endian uint64)
        "totals": _empty_totals(),
    }


class _UsageState:
    """Everything a read of one file leaves behind, resumable from its checkpoint.

    Counts the rows each read adds or changes, so an increment returns only those.
    """

    def __init__(
        self,
        checkpoint: Any | None,
        keep_events: int = KEEP_EVENTS,
        keep_requests: int = KEEP_REQUESTS,
    ) -> None:
        if checkpoint is None:
            checkpoint = _empty_checkpoint()
        elif not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a usage checkpoint of this format; read the file whole")
        self.keep_events, self.keep_requests = keep_events, keep_requests
        # Fresh containers (entries are shared: they are replaced, never changed in place).
        self.strings: list[str] = list(checkpoint["strings"])
        self.events: list[list[Any]] = list(checkpoint["events"])
        self.requests: list[list[Any]] = list(checkpoint["requests"])
        self.results: dict[str, bool] = dict(checkpoint["results"])
        self.spans: list[list[int]] = [list(span) for span in checkpoint["spans"]]
        self.data: dict[str, Any] = {
            **checkpoint,
            "strings": self.strings,
            "events": self.events,
            "requests": self.requests,
            "results": self.results,
            "spans": self.spans,
        }
        # Indexes over the entries: rebuilt on load, never stored.
        self.string_ids = {text: i for i, text in enumerate(self.strings)}
        self.request_at = {
            (entry[_R_MESSAGE], entry[_R_REQUEST]): i for i, entry in enumerate(self.requests)
        }
        self.tool_at = {
            entry[_E_TOOL_USE_ID]: i
            for i, entry in enumerate(self.events)
            if entry[_E_TOOL_USE_ID] is not None
        }
        self.event_ids = {entry[_E_EVENT_ID] for entry in self.events}
        totals = checkpoint["totals"]
        self.totals: dict[str, Any] = {
            **totals,
            "by_type": dict(totals["by_type"]),
            "models": {model: list(counted) for model, counted in totals["models"].items()},
            "tokens": list(totals["tokens"]),
        }
        # A request's ordinal in the whole file is `request_base` + its index here.
        self.request_base = totals["requests"] - len(self.requests)
        self.seen_bytes = base64.b64decode(checkpoint["seen"])
        # Digests of keys read before and no longer kept as entries (a set: looked up per key).
        self.seen: set[int] = set(array("Q", self.seen_bytes)) if self.seen_bytes else set()
        self.needed: list[str] = []  # keys of dropped entries these lines touch
        # Digests of the keys of events a whole read keeps all along, never dropped.
        self.pinned: set[int] = set(checkpoint.get("pinned", ()))
        # Each entry this read added (None) or changed (a copy as it was before): a row is
        # returned when it differs from that, not whenever a line touched it.
        self.events_before: dict[int, list[Any] | None] = {}
        self.requests_before: dict[int, list[Any] | None] = {}

    # --- packing ---

    def _id(self, text: str | None) -> int | None:
        """The index of a string in the table, adding it when new."""
        found = self.string_ids.get(text)  # type: ignore[arg-type]
        if found is not None or text is None:  # (new strings are rare: ids, models, paths)
            return found
        found = self.string_ids[text] = len(self.strings)
        self.strings.append(text)
        return found

    def _text(self, index: int | None) -> str | None:
        return None if index is None else self.strings[index]

    def _columns(self, session: Session, layout: _Layout, entries: list[list[Any]]) -> ColumnRows:
        """Entries as rows, column by column in table order (no dict per row)."""
        strings = self.strings
        times = {i for i, _ in layout.times}
        columns: dict[str, list[Any]] = {}
        # zip(*) turns the entries into columns in one pass (a request's extra value is unused).
        stored = list(zip(*entries, strict=True)) if entries else [()] * len(layout.packing)
        for i, (name, is_string) in enumerate(layout.packing):
            if is_string:
                columns[name] = [None if v is None else strings[v] for v in stored[i]]
            elif i in times:
                columns[name] = [None if v is None else _iso_micros(v) for v in stored[i]]
            else:
                columns[name] = list(stored[i])
        columns["session_file"] = [session.key] * len(entries)
        columns["username"] = [session.username] * len(entries)
        return ColumnRows({name: columns[name] for name in layout.table.column_names})

    # --- lines ---

    def add_line(self, session: Session, line: Line) -> None:
        """Count a line, record its time and workspace context, and take what it carries."""
        data = self.data
        data["lines"] += 1
        data["session_id"] = data["session_id"] or _str(line.sessionId)
        data["cwd"] = data["cwd"] or _str(line.cwd)
        data["git_branch"] = _str(line.gitBranch) or data["git_branch"]
        data["claude_version"] = _str(line.version) or data["claude_version"]
        ts = _timestamp(line.timestamp)
        at = _micros(ts) if ts is not None else None
        if at is not None:
            self._add_time(at)
        message = line.message
        if isinstance(message, Message):
            if line.type == "user":
                self._add_user(session, line, message, at)
            elif line.type == "assistant":
                self._add_assistant(session, line, message, at)

    def _add_time(self, at: int) -> None:
        """Merge a timestamp into the activity spans. The sum of gaps of at most the idle gap
        between sorted timestamps is the sum of span lengths, whatever order lines came in."""
        spans = self.spans
        last = spans[-1] if spans else None
        if last is not None and last[0] <= at <= last[1] + _IDLE_GAP_MICROS:
            if at > last[1]:  # the usual case: lines come in order
                last[1] = at
            return
        i = bisect_right(spans, at, key=lambda span: span[0])  # spans[i-1][0] <= at < spans[i][0]
        left = spans[i - 1] if i > 0 else None
        right = spans[i] if i < len(spans) else None
        if left is not None and at <= left[1]:
            return
        joins_left = left is not None and at - left[1] <= _IDLE_GAP_MICROS
        joins_right = right is not None and right[0] - at <= _IDLE_GAP_MICROS
        if left is not None and right is not None and joins_left and joins_right:
            left[1] = right[1]
            del spans[i]
        elif left is not None and joins_left:
            left[1] = at
        elif right is not None and joins_right:
            right[0] = at
        else:
            spans.insert(i, [at, at])

    def _new_event(self, session: Session, line: Line, event_id: str, at: int | None) -> list[Any]:
        """An event entry with the columns every event of a line shares, its strings interned
        in column order."""
        intern = self._id
        entry: list[Any] = [None] * len(_EVENTS.fields)
        entry[_E_EVENT_ID] = intern(event_id)
        entry[_E_SESSION_ID] = intern(_str(line.sessionId) or session.session_id)
        entry[_E_AGENT_ID] = intern(_str(line.agentId) or session.agent_id)
        entry[_E_SIDECHAIN] = line.isSidechain is True
        entry[_E_CWD] = intern(_str(line.cwd))
        entry[_E_GIT_BRANCH] = intern(_str(line.gitBranch))
        entry[_E_AT] = at
        return entry

    def _event_id(self, preferred: str | None, fallback: str) -> str:
        """A key no other event of the file has: rows are replaced by it."""
        for candidate in (preferred, fallback):
            if candidate is not None and self.string_ids.get(candidate) not in self.event_ids:
                self._not_seen("e" + candidate)
                return candidate
        n = 2
        while self.string_ids.get(f"{fallback}#{n}") in self.event_ids:
            n += 1
        self._not_seen(f"e{fallback}#{n}")
        return f"{fallback}#{n}"

    def _not_seen(self, key: str) -> None:
        """Note a key that is not among the kept entries but was read before: what these lines
        do to it depends on an entry the checkpoint dropped, so the read will raise
        WholeReadNeeded (after its last line, to name every such key)."""
        if self.seen and _digest(key) in self.seen:
            self.needed.append(key)

    def whole_read_needed(self) -> WholeReadNeeded:
        """What to raise when these lines touched dropped entries: the file is to be read whole,
        from a checkpoint that keeps the tool calls they touched all along (so a whole read in
        segments does not drop them again); from nothing when they touched a request (whose
        place in the file's order a kept entry cannot hold)."""
        keys = sorted(set(self.needed))
        error = f"lines refer to {len(keys)} entry(ies) read long before, e.g. {keys[0][1:]!r}"
        if any(key.startswith("r") for key in keys):
            return WholeReadNeeded(error)
        restart = _empty_checkpoint()
        restart["pinned"] = sorted({_digest(key) for key in keys} | self.pinned)
        return WholeReadNeeded(error, restart=restart)

    def _pinned(self, entry: list[Any]) -> bool:
        """Whether an event is to be kept all along (a whole read's restart names it)."""
        return any(
            entry[position] is not None
            and _digest(kind + self.strings[entry[position]]) in self.pinned
            for kind, position in (("e", _E_EVENT_ID), ("t", _E_TOOL_USE_ID))
        )

    def _append_event(self, entry: list[Any]) -> None:
        index = len(self.events)
        self.events.append(entry)
        self.event_ids.add(entry[_E_EVENT_ID])
        if entry[_E_TOOL_USE_ID] is not None:
            self.tool_at[entry[_E_TOOL_USE_ID]] = index
        self.events_before[index] = None

    def _add_user(self, session: Session, line: Line, message: Message, at: int | None) -> None:
        """Tool outcomes, human turns and typed slash commands from a user line."""
        content = message.content
        for block in _blocks(content):
            if block.type == "tool_result":
                tool_use_id = _str(block.tool_use_id)
                if tool_use_id is not None:
                    self._add_result(tool_use_id, failed=block.is_error is True)
        if _is_human_turn(line, content):
            self.data["user_messages"] += 1
        command = slash_command(content) if _may_be_typed(line) else None
        if command is not None:
            event_id = self._event_id(_str(line.uuid), f"line:{self.data['lines']}")
            entry = self._new_event(session, line, event_id, at)
            entry[_E_TYPE] = self._id(_SLASH)
            entry[_E_COMMAND], entry[_E_ARGS] = map(self._id, command)
            self._append_event(entry)

    def _add_result(self, tool_use_id: str, failed: bool) -> None:
        """A tool call failed when any of its results says so; a result may come before its
        call (or in another read), so it waits in `results` until the call is seen."""
        index = self.tool_at.get(self.string_ids.get(tool_use_id))
        if index is None:
            self._not_seen("t" + tool_use_id)
            self.results[tool_use_id] = self.results.get(tool_use_id, False) or failed
            return
        entry = self.events[index]
        outcome = entry[_E_IS_ERROR] is True or failed
        if entry[_E_IS_ERROR] != outcome:
            entry = entry[:]
            entry[_E_IS_ERROR] = outcome
            _replace(self.events, self.events_before, index, entry)

    def _add_assistant(
        self, session: Session, line: Line, message: Message, at: int | None
    ) -> None:
        """Tool calls and the API request from one streamed line of a response."""
        model = _str(message.model)
        if model == SYNTHETIC_MODEL or line.isApiErrorMessage is True:
            return  # a client-side API error notice, not a request
        message_id = _str(message.id)
        request_id = _str(line.requestId)
        for position, block in enumerate(_blocks(message.content)):
            if block.type == "tool_use":
                ids = (message_id, request_id)
                self._add_tool_use(session, line, block, position, model, ids, at)
        if message_id is not None or request_id is not None:
            self._add_request(session, line, message, message_id, request_id, model, at)

    def _add_tool_use(
        self,
        session: Session,
        line: Line,
        block: Block,
        position: int,
        model: str | None,
        ids: tuple[str | None, str | None],
        at: int | None,
    ) -> None:
        name = _str(block.name)
        if name is None:
            return
        tool_use_id = _str(block.id)
        if tool_use_id is not None:
            if self.string_ids.get(tool_use_id) in self.tool_at:
                return  # the same block repeated on another streamed line of the response
            self._not_seen("t" + tool_use_id)
        kind = classify_tool(name, block.input)
        event_id = self._event_id(tool_use_id, f"line:{self.data['lines']}:{position}")
        intern = self._id
        entry = self._new_event(session, line, event_id, at)
        entry[_E_TYPE] = intern(kind.event_type)
        entry[_E_TOOL] = intern(name)
        entry[_E_SKILL] = intern(kind.skill_name)
        entry[_E_SUBAGENT] = intern(kind.subagent_type)
        entry[_E_MCP_SERVER] = intern(kind.mcp_server)
        entry[_E_MCP_TOOL] = intern(kind.mcp_tool)
        entry[_E_MCP_PLUGIN] = intern(kind.mcp_plugin)
        entry[_E_TOOL_USE_ID] = intern(tool_use_id)
        # Results seen before the call; None until one arrives.
        entry[_E_IS_ERROR] = self.results.pop(tool_use_id, None) if tool_use_id else None
        entry[_E_MODEL] = intern(model)
        entry[_E_MESSAGE], entry[_E_REQUEST] = map(intern, ids)
        self._append_event(entry)

    def _add_request(
        self,
        session: Session,
        line: Line,
        message: Message,
        message_id: str | None,
        request_id: str | None,
        model: str | None,
        at: int | None,
    ) -> None:
        """Keep the most complete line of a request: a streamed response repeats its ids on
        every line, with placeholder figures until the last."""
        usage = message.usage if isinstance(message.usage, TokenUsage) else _NO_USAGE
        input_tokens = _int(usage.input_tokens)
        output_tokens = _int(usage.output_tokens)
        cache_write = _int(usage.cache_creation_input_tokens)
        cache_read = _int(usage.cache_read_input_tokens)
        split = usage.cache_creation if isinstance(usage.cache_creation, CacheCreation) else None
        write_5m = _int(split.ephemeral_5m_input_tokens) if split is not None else None
        write_1h = _int(split.ephemeral_1h_input_tokens) if split is not None else None
        has_split = write_5m is not None or write_1h is not None
        if has_split and cache_write is None:
            cache_write = (write_5m or 0) + (write_1h or 0)
        intern = self._id
        stop = intern(_str(message.stop_reason))
        key = (intern(message_id), intern(request_id))
        index = self.request_at.get(key)
        if index is None:
            self._not_seen(_request_key(message_id, request_id))
            previous = None
        else:
            previous = self.requests[index]
            score = (input_tokens or 0) + (output_tokens or 0) + (cache_write or 0)
            if (stop is not None, score + (cache_read or 0)) < _score(previous):
                # Keep the complete line's figures, but not its blank fields.
                if previous[_R_MODEL] is None and model is not None:
                    filled = previous[:]
                    filled[_R_MODEL] = intern(model)
                    filled[_R_PRICE_MODEL] = intern(_price_model(model))
                    _replace(self.requests, self.requests_before, index, filled)
                return
        # Built in place: this runs for every streamed line.
        entry: list[Any] = [None] * len(_REQUESTS.fields)
        entry[_R_INPUT] = input_tokens
        entry[_R_OUTPUT] = output_tokens
        entry[_R_CACHE_WRITE] = cache_write
        entry[_R_CACHE_READ] = cache_read
        entry[_R_STOP] = stop
        entry[_R_SESSION_ID] = intern(_str(line.sessionId) or session.session_id)
        entry[_R_AGENT_ID] = intern(_str(line.agentId) or session.agent_id)
        entry[_R_SIDECHAIN] = line.isSidechain is True
        entry[_R_MESSAGE], entry[_R_REQUEST] = key
        if model is not None:
            entry[_R_MODEL] = intern(model)
            entry[_R_PRICE_MODEL] = intern(_price_model(model))
        elif previous is not None:
            entry[_R_MODEL] = previous[_R_MODEL]
            entry[_R_PRICE_MODEL] = previous[_R_PRICE_MODEL]
        if has_split:
            entry[_R_WRITE_5M], entry[_R_WRITE_1H] = write_5m, write_1h
        entry[_R_SERVICE_TIER] = intern(_str(usage.service_tier))
        # The first line of the response, not the most complete one.
        first_seen = previous[_R_AT] if previous is not None else None
        entry[_R_AT] = first_seen if first_seen is not None else at
        if index is None:
            self.request_at[key] = index = len(self.requests)
            self.requests.append(entry)
            self.requests_before[index] = None
        else:
            _replace(self.requests, self.requests_before, index, entry)

    # --- results ---

    def increment(self, session: Session) -> Increment:
        """The rows this read added or changed, the summary, and the state to continue from."""
        data = self.data
        data["malformed_lines"] += session.malformed_lines
        if data["agent_type"] is None:
            data["agent_type"] = read_agent_type(session)
        self._count_changes()
        changed_events = _changed(self.events, self.events_before, len(_EVENTS.fields))
        changed_requests = _changed(self.requests, self.requests_before, len(_REQUESTS.fields))
        events = self._columns(session, _EVENTS, [self.events[i] for i in changed_events])
        requests = self._columns(session, _REQUESTS, [self.requests[i] for i in changed_requests])
        totals = self.totals
        return Increment(
            rows={
                USAGE_EVENTS.name: events,
                USAGE_REQUESTS.name: requests,
                USAGE_SESSIONS.name: [self.summary(session)],
            },
            items=totals["events"] + totals["requests"],
            checkpoint=self.checkpoint(),
        )

    def _count_changes(self) -> None:
        """Bring the running totals up to date with the entries this read added or replaced:
        take out what a replaced entry counted, add what its new version counts. (A tool
        call's name and type never change, only whether it failed.)"""
        totals, strings = self.totals, self.strings
        by_type, models, tokens = totals["by_type"], totals["models"], totals["tokens"]
        tools, skills = set(totals["tools"]), set(totals["skills"])
        for index, old in self.events_before.items():
            entry = self.events[index]
            event_type = strings[entry[_E_TYPE]]
            if old is None:
                totals["events"] += 1
                by_type[event_type] = by_type.get(event_type, 0) + 1
                if event_type != _SLASH:
                    tools.add(strings[entry[_E_TOOL]])
                    if entry[_E_SKILL] is not None:
                        skills.add(strings[entry[_E_SKILL]])
            if event_type != _SLASH:
                was_error = old is not None and old[_E_IS_ERROR] is True
                totals["tool_errors"] += (entry[_E_IS_ERROR] is True) - was_error
        for index, old in self.requests_before.items():
            entry = self.requests[index]
            if old is None:
                totals["requests"] += 1
            ordinal = self.request_base + index
            if old is not None and old[_R_MODEL] != entry[_R_MODEL] and old[_R_MODEL] is not None:
                counted = models[strings[old[_R_MODEL]]]
                counted[0] -= 1
                if not counted[0]:
                    del models[strings[old[_R_MODEL]]]
                elif counted[1] == ordinal:
                    # The model's first request changed model: which one is first now is in
                    # entries the checkpoint may not keep.
                    raise WholeReadNeeded("a request changed model")
            if entry[_R_MODEL] is not None and (old is None or old[_R_MODEL] != entry[_R_MODEL]):
                counted = models.setdefault(strings[entry[_R_MODEL]], [0, ordinal])
                counted[0] += 1
                counted[1] = min(counted[1], ordinal)
            for sign, counted in ((-1, old), (1, entry)):
                if counted is not None:
                    for position, (_, i) in enumerate(_SUMMED):
                        tokens[position] += sign * (counted[i] or 0)
        totals["tools"], totals["skills"] = sorted(tools), sorted(skills)

    def checkpoint(self) -> dict[str, Any]:
        """The state to continue from: the recent entries, the totals, and the digests of the
        keys of every entry no longer kept (the entries dropped now are digested now). Plain
        JSON. While nothing is dropped (most files) the entries and strings go as they are."""
        dropped_events = max(0, len(self.events) - self.keep_events)
        dropped_requests = max(0, len(self.requests) - self.keep_requests)
        events, requests, strings = self.events, self.requests, self.strings
        seen = self.seen_bytes
        if dropped_events or dropped_requests:
            text = self._text
            dropped, kept = events[:dropped_events], events[dropped_events:]
            if self.pinned:
                kept = [entry for entry in dropped if self._pinned(entry)] + kept
                dropped = [entry for entry in dropped if not self._pinned(entry)]
            digests = [
                _digest(f"{kind}{text(entry[position])}")
                for entry in dropped
                for kind, position in (("e", _E_EVENT_ID), ("t", _E_TOOL_USE_ID))
                if entry[position] is not None
            ]
            digests.extend(
                _digest(_request_key(text(entry[_R_MESSAGE]), text(entry[_R_REQUEST])))
                for entry in requests[:dropped_requests]
            )
            seen += array("Q", digests).tobytes()
            events, requests, strings = self._renumbered(kept, requests[dropped_requests:])
        return {
            **self.data,
            "spans": [list(span) for span in self.spans],
            "results": dict(self.results),
            "events": list(events),
            "requests": list(requests),
            "strings": list(strings),
            "seen": base64.b64encode(seen).decode("ascii"),
            "totals": {
                **self.totals,
                "by_type": dict(sorted(self.totals["by_type"].items())),
                "models": {
                    model: list(counted) for model, counted in sorted(self.totals["models"].items())
                },
                "tokens": list(self.totals["tokens"]),
            },
        }

    def _renumbered(
        self, events: list[list[Any]], requests: list[list[Any]]
    ) -> tuple[list[list[Any]], list[list[Any]], list[str]]:
        """Kept entries with their strings moved to a table of their own, so the table does
        not keep every id the file ever had."""
        strings: list[str] = []
        numbers: dict[int, int] = {}

        def moved(entries: list[list[Any]], positions: tuple[tuple[int, str], ...]) -> list[Any]:
            out = []
            for entry in entries:
                entry = entry[:]
                for position, _ in positions:
                    old = entry[position]
                    if old is not None:
                        new = numbers.get(old)
                        if new is None:
                            new = numbers[old] = len(strings)
                            strings.append(self.strings[old])
                        entry[position] = new
                out.append(entry)
            return out

        return moved(events, _EVENTS.strings), moved(requests, _REQUESTS.strings), strings

    def summary(self, session: Session) -> dict[str, Any]:
        """The file's summary row, from the running totals: exactly what a whole read of the
        same bytes gives, however the file was split into reads."""
        data, totals, spans = self.data, self.totals, self.spans
        by_type, models = totals["by_type"], totals["models"]
        # The most used model; a tie goes to the one whose first request came first.
        primary = (
            min(models.items(), key=lambda item: (-item[1][0], item[1][1]))[0] if models else None
        )
        row = {
            "session_file": session.key,
            "username": session.username,
            "session_id": session.session_id or data["session_id"],
            "agent_id": session.agent_id,
            "workflow_id": session.workflow_id,
            "is_subagent": session.is_subagent,
            "agent_type": data["agent_type"],
            "started_at": _iso_micros(spans[0][0]) if spans else None,
            "ended_at": _iso_micros(spans[-1][1]) if spans else None,
            # Time between consecutive activity, leaving out idle gaps longer than 5 minutes.
            "active_seconds": sum(last - first for first, last in spans) / 1_000_000,
            "user_messages": data["user_messages"],
            "assistant_messages": totals["requests"],
            "lines": data["lines"],
            "malformed_lines": data["malformed_lines"],
            "tool_calls": totals["events"] - by_type.get(_SLASH, 0),
            "tool_errors": totals["tool_errors"],
            "skill_calls": by_type.get("skill", 0),
            "subagent_calls": by_type.get("subagent", 0),
            "mcp_calls": by_type.get("mcp", 0),
            "slash_commands": by_type.get(_SLASH, 0),
            "distinct_tools": len(totals["tools"]),
            "distinct_skills": len(totals["skills"]),
            "primary_model": primary,
            **{name: totals["tokens"][n] for n, (name, _) in enumerate(_SUMMED)},
            "cwd": data["cwd"],
            "git_branch": data["git_branch"],
            "claude_version": data["claude_version"],
        }
        return {name: row[name] for name in USAGE_SESSIONS.column_names}


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
    """Turns one transcript into usage events, deduplicated requests and a session summary.

    Append-safe: `process_increment` continues from the checkpoint of the previous read with
    only the lines appended since, and returns only the rows they added or changed.
    """

    name = "usage"
    # 3: costs priced by views at query time (price_model stored instead of cost_usd), the
    # workflow id of workflow subagents.
    version = "3"
    cadence_seconds = 600
    append_safe = True
    uncapped = True  # local and cheap: SESSION_PROCESSOR_MAX_PER_RUN does not apply
    tables: tuple[Table, ...] = (USAGE_EVENTS, USAGE_REQUESTS, USAGE_SESSIONS)
    views: tuple[str, ...] = (
        PRICE_OVERRIDES_DDL,
        PRICES_VIEW,
        USAGE_REQUESTS_VIEW,
        COPIES_DDL,
        USAGE_REQUESTS_UNIQUE_VIEW,
        USAGE_SESSIONS_VIEW,
        *REPORT_VIEWS,
    )

    def process(self, session: Session) -> ProcessResult:
        increment = self.process_increment(session, None)
        return ProcessResult(rows=increment.rows, items=increment.items)

    def __init__(self, keep_events: int = KEEP_EVENTS, keep_requests: int = KEEP_REQUESTS) -> None:
        self.keep_events, self.keep_requests = keep_events, keep_requests

    def process_increment(self, session: Session, checkpoint: Any | None) -> Increment:
        """Continue from `checkpoint` (None: from the start of the file) with the session's
        lines; the returned checkpoint is plain JSON (dicts, lists, str, int, float, bool).
        Raises WholeReadNeeded when the lines refer to an entry the checkpoint no longer
        keeps."""
        state = _UsageState(checkpoint, self.keep_events, self.keep_requests)
        for line in session.typed_lines(Line):
            state.add_line(session, line)
        if state.needed:
            raise state.whole_read_needed()
        return state.increment(session)
