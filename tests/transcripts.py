"""Builders for transcript lines in the real Claude Code JSONL shape.

Tests of the old system used a made-up flat shape and passed while real files were misread.
These builders produce what Claude Code writes: `message` nested with `id`, `model`, content
blocks and `usage`; one line per content block of a streamed response, each repeating
`message.id` and `requestId`; `uuid`/`parentUuid` chains; workspace fields on every line.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

SONNET = "claude-sonnet-4-5-20250929"
_counter = itertools.count(1)


def _next_id(prefix: str) -> str:
    return f"{prefix}{next(_counter):024d}"


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def thinking(value: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": value, "signature": "EqQBCkYIBxgCKkB"}


def tool_use(
    tool_use_id: str, name: str, tool_input: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_use_id, "name": name, "input": tool_input or {}}


def usage(
    input_tokens: int = 4,
    output_tokens: int = 350,
    cache_write: int = 1200,
    cache_read: int = 15000,
    cache_write_1h: int = 0,
) -> dict[str, Any]:
    """A usage object as the API reports it, with the 5m/1h cache-write split."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": cache_write - cache_write_1h,
            "ephemeral_1h_input_tokens": cache_write_1h,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


class Transcript:
    """A session being written line by line, with a clock and a uuid chain."""

    def __init__(
        self,
        session_id: str,
        *,
        start: str = "2025-09-01T10:00:00.000Z",
        cwd: str = "/home/alice/src/shop",
        git_branch: str = "main",
        version: str = "2.0.14",
        agent_id: str | None = None,
        is_sidechain: bool = False,
    ) -> None:
        self.session_id = session_id
        self.clock = datetime.fromisoformat(start)
        self.cwd = cwd
        self.git_branch = git_branch
        self.version = version
        self.agent_id = agent_id
        self.is_sidechain = is_sidechain
        self.parent: str | None = None
        self.lines: list[dict[str, Any] | str] = []

    def timestamp(self, advance: float) -> str:
        self.clock += timedelta(seconds=advance)
        return self.clock.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def _line(self, line_type: str, advance: float, **fields: Any) -> dict[str, Any]:
        uuid = _next_id("uuid-")
        line: dict[str, Any] = {
            "parentUuid": self.parent,
            "isSidechain": self.is_sidechain,
            "userType": "external",
            "cwd": self.cwd,
            "sessionId": self.session_id,
            "version": self.version,
            "gitBranch": self.git_branch,
        }
        if self.agent_id is not None:
            line["agentId"] = self.agent_id
        line.update(type=line_type, uuid=uuid, timestamp=self.timestamp(advance), **fields)
        self.parent = uuid
        self.lines.append(line)
        return line

    def user(
        self, content: str | list[Any], *, advance: float = 5, **fields: Any
    ) -> dict[str, Any]:
        """A user line: typed text, text blocks, or tool results."""
        return self._line("user", advance, message={"role": "user", "content": content}, **fields)

    def tool_result(
        self, tool_use_id: str, *, is_error: bool | None = None, advance: float = 2
    ) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id}
        block["content"] = "Exit code 1\nerror: no such file" if is_error else "ok"
        if is_error is not None:
            block["is_error"] = is_error
        return self.user([block], advance=advance, toolUseResult={"stdout": "", "stderr": ""})

    def slash_command(self, name: str, args: str = "", *, advance: float = 5) -> dict[str, Any]:
        """What Claude Code writes when the user types `/name args`."""
        content = (
            f"<command-message>{name} is running…</command-message>\n"
            f"<command-name>/{name}</command-name>\n"
            f"<command-args>{args}</command-args>"
        )
        return self.user(content, advance=advance)

    def response(
        self,
        blocks: list[dict[str, Any]],
        *,
        model: str = SONNET,
        final_usage: dict[str, Any] | None = None,
        stop_reason: str = "end_turn",
        message_id: str | None = None,
        request_id: str | bool | None = True,
        placeholder_output: int = 1,
        advance: float = 3,
    ) -> list[dict[str, Any]]:
        """A streamed response: one line per block, all repeating message.id and requestId;
        every line but the last has stop_reason null and a placeholder output_tokens.
        `request_id=None` leaves requestId out (third-party gateways)."""
        message_id = message_id or _next_id("msg_01")
        rid = _next_id("req_011C") if request_id is True else request_id
        complete = final_usage or usage()
        written = []
        for index, block in enumerate(blocks):
            last = index == len(blocks) - 1
            line_usage = dict(complete)
            if not last:
                line_usage["output_tokens"] = placeholder_output
            message = {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [block],
                "stop_reason": stop_reason if last else None,
                "stop_sequence": None,
                "usage": line_usage,
            }
            fields: dict[str, Any] = {"message": message}
            if rid is not None:
                fields["requestId"] = rid
            written.append(self._line("assistant", advance if index == 0 else 0.4, **fields))
        return written

    def api_error(self, *, advance: float = 1) -> dict[str, Any]:
        """A client-side API error notice: model `<synthetic>`, not a request."""
        message = {
            "id": _next_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": "<synthetic>",
            "content": [text("API Error: 529 Overloaded")],
            "stop_reason": "stop_sequence",
            "usage": usage(0, 0, 0, 0),
        }
        return self._line("assistant", advance, message=message, isApiErrorMessage=True)

    def other(self, line: dict[str, Any]) -> None:
        """A non-conversation line (summary, system, snapshot …) exactly as given."""
        self.lines.append(line)

    def raw(self, content: str) -> None:
        """A raw line, e.g. truncated JSON."""
        self.lines.append(content)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for line in self.lines:
                f.write(line.encode() if isinstance(line, str) else orjson.dumps(line))
                f.write(b"\n")
        return path
