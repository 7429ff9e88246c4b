"""The conversation in a transcript: what the person typed and what the assistant answered.

The old verification prompt read top-level `role`/`content`, but real lines keep them under
`message`, so on real transcripts the model saw empty turns. Here a user turn is a `user`
line whose `message.content` is a string or holds text blocks, excluding what Claude Code
writes on the user's behalf: tool results, `isMeta` expansions (skill and command prompts),
compaction summaries, subagent prompts (`isSidechain`) and echoed local-command output. A typed
slash command is kept as the command the person typed (`/review PR 42`).

An assistant turn is everything the assistant wrote between two user turns: the text blocks
of its messages (a streamed message repeats its `message.id` on one line per block; blocks are
deduplicated per message) and a short `[tool: Name]` for each tool call; thinking is left
out. One pass, bounded memory: only the last `max_turns` turns are kept and every turn is
clipped to its head and tail as it grows.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Role = Literal["user", "assistant"]
TextFilter = Callable[[str], tuple[str, int]]  # text -> (cleaned text, replacements), e.g. redact

_LOCAL_COMMAND_OUTPUT = ("<local-command-stdout>", "<local-command-stderr>")
# Context the client injects into a user message; not the person's words. Tags are paired
# with find() scans, not lazy `<tag>.*?</tag>` regexes, which are quadratic in the number of
# unclosed opening tags.
_INJECTED_OPEN = re.compile(r"<(system-reminder|ide_selection|ide_opened_file|ide_diagnostics)>")
_INTERRUPTED = re.compile(r"^\[Request interrupted by user[^\]]*\]$")
_SYNTHETIC_MODEL = "<synthetic>"


@dataclass(frozen=True)
class Turn:
    """One turn of the conversation. User turns carry their line's timestamp and uuid, so
    what is extracted from them links back (a resumed session copies lines with their uuid)."""

    role: Role
    text: str
    timestamp: str | None = None
    uuid: str | None = None
    redactions: int = 0


class Clip:
    """A growing text kept as its first and last characters (`limit` in all), so a turn
    made of a huge paste or a long agentic stretch never holds more than that in memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head_budget = limit // 2
        self.tail_budget = limit - self.head_budget
        self.head: list[str] = []
        self.head_len = 0
        self.tail: deque[str] = deque()
        self.tail_len = 0
        self.total = 0

    def add(self, piece: str) -> None:
        self.total += len(piece)
        if self.head_len < self.head_budget:
            taken = piece[: self.head_budget - self.head_len]
            self.head.append(taken)
            self.head_len += len(taken)
            piece = piece[len(taken) :]
        if piece:
            self.tail.append(piece)
            self.tail_len += len(piece)
            while self.tail and self.tail_len - len(self.tail[0]) >= self.tail_budget:
                self.tail_len -= len(self.tail.popleft())

    def text(self) -> str:
        head, tail = "".join(self.head), "".join(self.tail)
        if self.total <= self.limit:
            return head + tail
        tail = tail[-self.tail_budget :]
        omitted = self.total - len(head) - len(tail)
        return f"{head}\n[… {omitted} characters omitted …]\n{tail}"


def clip(text: str, limit: int) -> str:
    """`text` cut to its head and tail around a marker when longer than `limit`."""
    c = Clip(limit)
    c.add(text)
    return c.text()


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _blocks(content: object) -> Iterable[Mapping[str, Any]]:
    if isinstance(content, list):
        return (block for block in content if isinstance(block, dict))
    return ()


def _timestamp(value: object) -> str | None:
    """ISO-8601 UTC text for a line's timestamp, or None when it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def tag_text(text: str, tag: str) -> str | None:
    """The text between the first `<tag>` and the first `</tag>` after it, or None. A find()
    scan: a lazy `<tag>(.*?)</tag>` regex is quadratic in the number of unclosed `<tag>`s."""
    start = text.find(f"<{tag}>")
    if start < 0:
        return None
    start += len(tag) + 2
    end = text.find(f"</{tag}>", start)
    return None if end < 0 else text[start:end]


def _strip_injected(text: str) -> str:
    """`text` without its injected `<tag>…</tag>` blocks, each opening tag paired with the
    first closing tag after it (a tag never closed is kept). Linear: once a tag has no
    closing tag after some opening, no later opening of it has one either."""
    kept: list[str] = []
    done = 0  # text before this is settled
    at = 0
    unclosed: set[str] = set()
    while (opening := _INJECTED_OPEN.search(text, at)) is not None:
        tag = opening.group(1)
        at = opening.end()
        if tag in unclosed:
            continue
        end = text.find(f"</{tag}>", at)
        if end < 0:
            unclosed.add(tag)
            continue
        kept.append(text[done : opening.start()])
        done = at = end + len(tag) + 3
    kept.append(text[done:])
    return "".join(kept)


def _typed_text(text: str) -> str | None:
    """The person's words in one piece of user content, or None when there are none."""
    stripped = text.strip()
    if stripped.startswith(_LOCAL_COMMAND_OUTPUT):
        return None
    name = tag_text(stripped, "command-name")
    if name is not None:
        args = tag_text(stripped, "command-args")
        typed = f"{name.strip()} {args.strip()}" if args is not None else name.strip()
        return typed.strip() or None
    stripped = _strip_injected(stripped).strip()
    if not stripped or _INTERRUPTED.match(stripped):
        return None
    return stripped


def user_texts(line: Mapping[str, Any]) -> list[str]:
    """The pieces of text a person typed in a `user` line (empty when it is not speech)."""
    if line.get("type") != "user":
        return []
    if any(line.get(flag) is True for flag in ("isMeta", "isCompactSummary", "isSidechain")):
        return []
    message = line.get("message")
    if not isinstance(message, dict):
        return []
    content = message.get("content")
    if isinstance(content, str):
        raw = [content]
    else:
        raw = [
            block["text"]
            for block in _blocks(content)
            if block.get("type") == "text" and isinstance(block.get("text"), str)
        ]
    return [typed for text in raw if (typed := _typed_text(text)) is not None]


def _is_assistant_output(line: Mapping[str, Any]) -> bool:
    if line.get("type") != "assistant" or line.get("isSidechain") is True:
        return False
    if line.get("isApiErrorMessage") is True:
        return False
    message = line.get("message")
    return isinstance(message, dict) and message.get("model") != _SYNTHETIC_MODEL


def _clean(clean: TextFilter | None, clipped: str) -> tuple[str, int]:
    """The clipped text cleaned once more: a cut can give a secret glued to a word (missed
    by a `\b` pattern) the boundary it lacked, so the text sent must be cleaned as sent."""
    return clean(clipped) if clean is not None else (clipped, 0)


class _AssistantTurn:
    """The assistant's output since the last user turn, as it streams in."""

    def __init__(self, limit: int, clean: TextFilter | None) -> None:
        self.clip = Clip(limit)
        self.clean = clean
        self.last_kind: str | None = None
        self.redactions = 0

    def add(self, kind: Literal["text", "tool"], piece: str) -> None:
        if kind == "text" and self.clean is not None:
            piece, found = self.clean(piece)
            self.redactions += found
        if self.last_kind is not None:
            self.clip.add(" " if kind == "tool" and self.last_kind == "tool" else "\n\n")
        self.clip.add(piece)
        self.last_kind = kind

    def turn(self) -> Turn | None:
        text, found = _clean(self.clean, self.clip.text().strip())
        return Turn("assistant", text, redactions=self.redactions + found) if text else None


class TurnReader:
    """Feed lines in order with `add`; `turns()` gives the last `max_turns` turns."""

    def __init__(
        self, *, max_turns: int = 100, max_turn_chars: int = 6000, clean: TextFilter | None = None
    ) -> None:
        self.max_turn_chars = max_turn_chars
        self.clean = clean
        self._turns: deque[Turn] = deque(maxlen=max_turns)
        self.total = 0  # turns seen, including those that fell out of the window
        self._assistant: _AssistantTurn | None = None
        self._seen_blocks: set[tuple[str, str]] = set()

    def add(self, line: Mapping[str, Any]) -> None:
        texts = user_texts(line)
        if texts:
            self._close_assistant()
            self._add_user(line, texts)
        elif _is_assistant_output(line):
            self._add_assistant(line)

    def _add_user(self, line: Mapping[str, Any], texts: list[str]) -> None:
        found = 0
        if self.clean is not None:
            cleaned = []
            for text in texts:
                text, n = self.clean(text)
                cleaned.append(text)
                found += n
            texts = cleaned
        text, found_after = _clean(self.clean, clip("\n\n".join(texts), self.max_turn_chars))
        self.total += 1
        self._turns.append(
            Turn(
                "user",
                text,
                timestamp=_timestamp(line.get("timestamp")),
                uuid=_str(line.get("uuid")),
                redactions=found + found_after,
            )
        )

    def _add_assistant(self, line: Mapping[str, Any]) -> None:
        message = line["message"]
        message_id = _str(message.get("id"))
        content = message.get("content")
        pieces: list[tuple[Literal["text", "tool"], str, str]] = []
        if isinstance(content, str) and content.strip():
            pieces.append(("text", content.strip(), content))
        for block in _blocks(content):
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str) and block["text"].strip():
                pieces.append(("text", block["text"].strip(), block["text"]))
            elif kind == "tool_use" and _str(block.get("name")):
                key = _str(block.get("id")) or block["name"]
                pieces.append(("tool", f"[tool: {block['name']}]", key))
        for kind, piece, identity in pieces:
            if message_id is not None:
                digest = hashlib.sha1(identity.encode(), usedforsecurity=False).hexdigest()
                key = (message_id, f"{kind}:{digest}")
                if key in self._seen_blocks:
                    continue  # the same block repeated on another streamed line
                self._seen_blocks.add(key)
            if self._assistant is None:
                self._assistant = _AssistantTurn(self.max_turn_chars, self.clean)
            self._assistant.add(kind, piece)

    def _close_assistant(self) -> None:
        if self._assistant is not None:
            turn = self._assistant.turn()
            if turn is not None:
                self.total += 1
                self._turns.append(turn)
            self._assistant = None
        self._seen_blocks.clear()  # a message never spans a user turn

    def turns(self) -> list[Turn]:
        self._close_assistant()
        return list(self._turns)


def read_turns(
    lines: Iterable[Mapping[str, Any]],
    *,
    max_turns: int = 100,
    max_turn_chars: int = 6000,
    clean: TextFilter | None = None,
) -> list[Turn]:
    """The last `max_turns` turns of a transcript, each cleaned (e.g. redacted) piece by
    piece before it is clipped, so a secret is never cut in half and half-sent, and cleaned
    again once clipped, so a cut that gives a glued secret a word boundary never sends it."""
    reader = TurnReader(max_turns=max_turns, max_turn_chars=max_turn_chars, clean=clean)
    for line in lines:
        reader.add(line)
    return reader.turns()
