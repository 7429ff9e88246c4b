"""Seeded generator of realistic Claude Code transcript corpora for the benchmarks.

Shape (see ../shared/reference/claude-code-jsonl.md and examples/make_sessions.py):
`<root>/<user>/<session-id>.jsonl`, current subagent transcripts under
`<user>/<session-id>/subagents/agent-<id>.jsonl` with their `.meta.json`, a few older ones
beside the session (`<user>/agent-<id>.jsonl`). Lines are the real format: user/assistant lines
with a nested `message`, responses streamed one line per content block repeating
`message.id`/`requestId`/`usage` (only the last with `stop_reason` and the final
`output_tokens`), tool_use/tool_result pairs with `toolUseResult` metadata, skills, subagents,
MCP tools, typed slash commands and their local-command output, thinking blocks with
signatures, API error lines, compactions, file-history snapshots, queue operations, and a few
malformed (truncated) lines.

Sizes: a log-normal body (median ~12 KB target, a few KB at the small end) plus a tail of long
sessions up to `max_bytes` (one per 10,000 sessions, log-spaced from max/10 to max).

Deterministic: session `i` of seed `s` draws everything from its own `random.Random`, so a
corpus is byte-identical whatever the number of worker processes. Corpora are written once
under `$BENCH_DIR` (default `/tmp/session-pipeline-bench`), named by their parameters and
reused while a manifest says they are complete.

    python -m bench.corpus --sessions 10000 [--max-mb 50] [--seed 7]
    python -m bench.corpus --big-mb 500
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import random
import re
import shutil
import string
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

GENERATOR_VERSION = 1
DEFAULT_SEED = 20261128
MB = 1 << 20

SONNET = "claude-sonnet-4-5-20250929"
OPUS = "claude-opus-4-5-20251101"
OPUS_41 = "claude-opus-4-1-20250805"
HAIKU = "claude-haiku-4-5-20251001"
MAIN_MODELS = (SONNET, OPUS, HAIKU, OPUS_41)
MAIN_MODEL_WEIGHTS = (60, 25, 10, 5)
SUBAGENT_MODELS = (HAIKU, SONNET)

VERSIONS = ("2.0.76", "2.1.3", "2.1.19", "2.1.31", "2.1.42")
BRANCHES = (
    "main",
    "main",
    "develop",
    "feat/export-csv",
    "fix/flaky-refund-test",
    "chore/bump-deps",
    "feat/billing-v2",
    "refactor/scan",
)
PROJECTS = (
    "payments-api",
    "web-dashboard",
    "data-platform",
    "infra",
    "mobile-app",
    "ml-pipelines",
    "docs-site",
    "session-pipeline",
)
SKILLS = ("pdf", "xlsx", "docx", "frontend-design", "superpowers:brainstorming", "review:pr")
MCP_TOOLS = (
    "mcp__github__get_issue",
    "mcp__github__create_pull_request",
    "mcp__postgres__query",
    "mcp__context7__get-library-docs",
    "mcp__plugin_linear_linear__list_issues",
    "mcp__plugin_playwright_playwright__browser_navigate",
)
SUBAGENT_TYPES = ("Explore", "general-purpose", "Plan", "code-reviewer")
SLASH_COMMANDS = (
    ("/clear", ""),
    ("/model", "opus"),
    ("/review", "412"),
    ("/init", ""),
    ("/cost", ""),
    ("/commit", ""),
    ("/pr-comments", "https://github.com/acme/payments-api/pull/412"),
)
# (tool, weight): plain tools, then the ones the usage processor classifies specially.
TOOLS = (
    ("Read", 30),
    ("Bash", 22),
    ("Edit", 15),
    ("Grep", 9),
    ("Glob", 5),
    ("Write", 5),
    ("TodoWrite", 4),
    ("WebFetch", 2),
    ("WebSearch", 1),
    ("Skill", 2),
    ("Agent", 2),
    ("Task", 1),
    ("mcp", 4),
)
TOOL_NAMES = tuple(t for t, _ in TOOLS)
TOOL_WEIGHTS = tuple(w for _, w in TOOLS)
FIRST_NAMES = (
    "alice",
    "bob",
    "carol",
    "dan",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "niaj",
    "olivia",
    "peggy",
    "rupert",
    "sybil",
    "trent",
    "victor",
    "walter",
    "xavier",
    "yasmin",
    "zoe",
)

ALNUM = string.ascii_letters + string.digits
_WORDS = (
    "refund",
    "charge",
    "amount",
    "currency",
    "decimal",
    "quantize",
    "rounding",
    "cents",
    "customer",
    "invoice",
    "ledger",
    "session",
    "transcript",
    "scan",
    "state",
    "commit",
    "batch",
    "flow",
    "task",
    "worker",
    "retry",
    "quarantine",
    "hash",
    "mtime",
    "export",
    "column",
    "timezone",
    "settings",
    "dashboard",
    "render",
    "table",
    "row",
    "header",
    "cache",
    "token",
    "request",
    "model",
    "usage",
    "tool",
    "skill",
    "agent",
    "server",
    "query",
    "index",
    "schema",
    "migration",
    "version",
    "deploy",
    "config",
    "error",
    "failing",
    "passed",
    "assert",
    "expected",
    "actual",
    "value",
    "return",
    "import",
    "from",
    "def",
    "class",
    "self",
    "async",
    "await",
    "const",
    "let",
    "function",
    "props",
    "state",
    "effect",
    "hook",
    "test",
    "fixture",
    "mock",
    "patch",
)
_IDENTS = [w for w in _WORDS if w.isalpha()]
_PROMPTS = (
    "Why does test_partial_refund_rounding fail on CI but not locally?",
    "Add a timezone column to the CSV export and make sure the dates use it.",
    "Refactor the scanner so it never opens a file whose size and mtime are unchanged.",
    "Can you review this migration before I run it on staging?",
    "The dashboard is slow when the table has more than 10k rows. Find out why.",
    "Write tests for the retry logic in the webhook handler.",
    "Summarise what changed in this branch compared to main.",
    "Bump the dependencies and fix whatever breaks.",
    "Explain how the prompt cache affects our token costs.",
    "Turn the retention policy PDF into a checklist in docs/.",
)


def _text_pool(rng: random.Random, size: int = 1 << 19) -> str:
    """Code-and-prose-like text, sliced at random offsets to fill contents of any length."""
    parts: list[str] = []
    total = 0
    while total < size:
        kind = rng.random()
        if kind < 0.45:
            indent = " " * (4 * rng.randint(0, 3))
            name, a, b = rng.choice(_IDENTS), rng.choice(_IDENTS), rng.choice(_IDENTS)
            line = f"{indent}{rng.choice(('def', 'if', 'return', 'for', 'x ='))} {name}_{a}({b})"
        elif kind < 0.75:
            line = " ".join(rng.choices(_WORDS, k=rng.randint(4, 14))).capitalize() + "."
        elif kind < 0.9:
            line = f'    "{rng.choice(_IDENTS)}": {rng.randint(0, 99999)},  # {rng.choice(_WORDS)}'
        else:
            line = f"src/{rng.choice(_IDENTS)}/{rng.choice(_IDENTS)}.py:{rng.randint(1, 900)}: ok →"
        parts.append(line)
        total += len(line) + 1
    return "\n".join(parts)


_POOL = _text_pool(random.Random(1))
_POOL_LEN = len(_POOL)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class _Writer:
    """One transcript being generated: the parentUuid chain, the clock, a prompt-cache model
    so token numbers grow plausibly, and the subagents it spawned."""

    def __init__(
        self,
        rng: random.Random,
        user: str,
        session_id: str,
        *,
        cwd: str,
        branch: str,
        version: str,
        model: str,
        t0: float,
        agent_id: str | None = None,
    ) -> None:
        self.rng = rng
        self.session_id = session_id
        self.model = model
        self.t = t0
        self.agent_id = agent_id
        self.base: dict[str, Any] = {
            "parentUuid": None,
            "isSidechain": agent_id is not None,
            "userType": "external",
            "cwd": cwd,
            "sessionId": session_id,
            "version": version,
            "gitBranch": branch,
        }
        if agent_id is not None:
            self.base["agentId"] = agent_id
        self.parent: str | None = None
        self.cached = 0 if agent_id else 11_904
        self.pending = 9_000
        self.lines: list[bytes] = []
        self.size = 0
        self.malformed = 0
        self.subagents: list[dict[str, Any]] = []
        self.cwd = cwd

    # ---- primitives ------------------------------------------------------------------------
    def _uuid(self) -> str:
        h = f"{self.rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"

    def _rand(self, n: int) -> str:
        return "".join(self.rng.choices(ALNUM, k=n))

    def _text(self, n: int) -> str:
        n = max(1, min(n, _POOL_LEN - 1))
        start = self.rng.randrange(0, _POOL_LEN - n)
        return _POOL[start : start + n]

    def _advance(self, lo: float, hi: float) -> None:
        self.t += self.rng.uniform(lo, hi)

    def _emit(self, line: dict[str, Any]) -> None:
        raw = orjson.dumps(line)
        self.lines.append(raw)
        self.size += len(raw) + 1

    def _line(self, kind: str) -> dict[str, Any]:
        d = self.base.copy()
        d["parentUuid"] = self.parent
        d["type"] = kind
        return d

    # ---- user side -------------------------------------------------------------------------
    def user(
        self,
        content: Any,
        *,
        tool_use_result: Any = None,
        uid: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self._advance(0.2, 3.0)
        d = self._line("user")
        d["message"] = {"role": "user", "content": content}
        if extra:
            d.update(extra)
        d["uuid"] = uid = uid or self._uuid()
        d["timestamp"] = _iso(self.t)
        if tool_use_result is not None:
            d["toolUseResult"] = tool_use_result
        self._emit(d)
        self.parent = uid
        self.pending += len(content) if isinstance(content, str) else 200

    def prompt(self, text: str) -> None:
        self._advance(15, 120)
        uid = self._uuid()
        if self.agent_id is None:
            self._emit(
                {
                    "type": "file-history-snapshot",
                    "messageId": uid,
                    "snapshot": {
                        "messageId": uid,
                        "trackedFileBackups": {},
                        "timestamp": _iso(self.t),
                    },
                    "isSnapshotUpdate": False,
                }
            )
        self.user(text, uid=uid)

    def slash_command(self) -> None:
        name, args = self.rng.choice(SLASH_COMMANDS)
        self._advance(5, 60)
        self.user(
            f"<command-name>{name}</command-name>\n            <command-message>{name[1:]}"
            f"</command-message>\n            <command-args>{args}</command-args>"
        )
        if name in ("/model", "/cost"):
            self.user(
                f"<local-command-stdout>{self._text(self.rng.randint(40, 160))}"
                "</local-command-stdout>"
            )

    # ---- assistant side --------------------------------------------------------------------
    def respond(self, blocks: list[dict[str, Any]]) -> None:
        """One API response streamed one line per block, the way Claude Code writes it."""
        rng = self.rng
        msg_id = "msg_01" + self._rand(22)
        req_id = "req_011C" + self._rand(20)
        creation = 80 + self.pending // 4 + rng.randint(0, 90)
        read = self.cached
        self.cached += creation
        self.pending = 0
        five = rng.random() < 0.7
        usage = {
            "input_tokens": rng.choice((3, 4, 5, 6, 8, 9, 10)),
            "cache_creation_input_tokens": creation,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": creation if five else 0,
                "ephemeral_1h_input_tokens": 0 if five else creation,
            },
            "output_tokens": 0,
            "service_tier": "standard",
        }
        out_chars = sum(len(orjson.dumps(b)) for b in blocks)
        final_out = max(12, out_chars // 4 + rng.randint(8, 60))
        placeholder = rng.choice((1, 2, 3, 5, 8))
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        self._advance(2, 12)
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            u = dict(usage, output_tokens=final_out if last else placeholder)
            d = self._line("assistant")
            d["message"] = {
                "model": self.model,
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "content": [block],
                "stop_reason": stop if last else None,
                "stop_sequence": None,
                "usage": u,
            }
            d["requestId"] = req_id
            d["uuid"] = uid = self._uuid()
            d["timestamp"] = _iso(self.t)
            self._emit(d)
            self.parent = uid
            self._advance(0.3, 2.5)
        self.pending += out_chars

    def api_error(self) -> None:
        self._advance(30, 60)
        d = self._line("assistant")
        d["message"] = {
            "id": self._uuid(),
            "model": "<synthetic>",
            "role": "assistant",
            "stop_reason": "stop_sequence",
            "stop_sequence": "",
            "type": "message",
            "usage": {"input_tokens": 0, "output_tokens": 0},
            "content": [{"type": "text", "text": "API Error: 529 Overloaded. Retrying later."}],
        }
        d["uuid"] = uid = self._uuid()
        d["timestamp"] = _iso(self.t)
        d["isApiErrorMessage"] = True
        self._emit(d)
        self.parent = uid

    def system(self, subtype: str, **fields: Any) -> None:
        self._advance(0.05, 0.5)
        d = self._line("system")
        d["subtype"] = subtype
        d.update(fields)
        d["isMeta"] = False
        d["timestamp"] = _iso(self.t)
        d["uuid"] = self._uuid()
        self._emit(d)

    # ---- tools -----------------------------------------------------------------------------
    def _result_size(self) -> int:
        return int(min(60_000, max(20, self.rng.lognormvariate(math.log(700), 1.4))))

    def _tool(self) -> tuple[dict[str, Any], Any, Any, bool]:
        """A tool_use block and what comes back: (block, result content, toolUseResult,
        is_error)."""
        rng = self.rng
        name = rng.choices(TOOL_NAMES, TOOL_WEIGHTS)[0]
        path = f"{self.cwd}/src/{rng.choice(_IDENTS)}/{rng.choice(_IDENTS)}.py"
        size = self._result_size()
        error = rng.random() < 0.04
        if name == "Read":
            body = self._text(size)
            out = "\n".join(f"{i:>6}→{line}" for i, line in enumerate(body.split("\n"), 1))
            meta = {"type": "text", "file": {"filePath": path, "content": body, "startLine": 1}}
            return {"name": name, "input": {"file_path": path}}, out, meta, error
        if name == "Bash":
            body = self._text(size)
            cmd = rng.choice(("pytest -q", "git status", "ruff check .", "npm test", "ls -la"))
            meta = {"stdout": body, "stderr": "", "interrupted": False, "isImage": False}
            if error:
                body = "Exit code 1\n" + body
            return (
                {"name": name, "input": {"command": cmd, "description": "Run"}},
                body,
                meta,
                error,
            )
        if name in ("Edit", "Write"):
            old, new = self._text(rng.randint(20, 400)), self._text(rng.randint(20, 600))
            inp = (
                {"file_path": path, "old_string": old, "new_string": new}
                if name == "Edit"
                else {"file_path": path, "content": self._text(size)}
            )
            msg = f"The file {path} has been updated." if not error else "String not found."
            return {"name": name, "input": inp}, msg, {"filePath": path}, error
        if name == "Skill":
            skill = rng.choice(SKILLS)
            inp = {"skill": skill}
            return {"name": name, "input": inp}, f"Launching skill: {skill}", None, False
        if name in ("Agent", "Task"):
            agent_id = f"{rng.getrandbits(32):08x}"
            kind = rng.choice(SUBAGENT_TYPES)
            desc = " ".join(rng.choices(_WORDS, k=4)).capitalize()
            inp = {"description": desc, "prompt": self._text(300), "subagent_type": kind}
            self.subagents.append({"agent_id": agent_id, "agentType": kind, "description": desc})
            body = [{"type": "text", "text": self._text(min(size, 4000))}]
            return (
                {"name": name, "input": inp},
                body,
                {"status": "completed", "agentId": agent_id},
                False,
            )
        if name == "mcp":
            tool = rng.choice(MCP_TOOLS)
            inp = {"query": " ".join(rng.choices(_WORDS, k=5))}
            return {"name": tool, "input": inp}, self._text(size), None, error
        inp = {"pattern": rng.choice(_IDENTS), "path": self.cwd}
        return {"name": name, "input": inp}, self._text(min(size, 3000)), None, False

    # ---- a whole exchange ------------------------------------------------------------------
    def turn(self) -> None:
        """A prompt, one to five model steps with tool calls and their results, a final
        answer and the turn's duration, with the occasional oddity real files have."""
        rng = self.rng
        if self.agent_id is None and rng.random() < 0.05:
            self.slash_command()
        if self.agent_id is None and rng.random() < 0.02:
            self._emit(
                {
                    "type": "queue-operation",
                    "operation": "enqueue",
                    "timestamp": _iso(self.t),
                    "sessionId": self.session_id,
                    "content": rng.choice(_PROMPTS),
                }
            )
        self.prompt(rng.choice(_PROMPTS) + " " + self._text(rng.randint(0, 300)))
        for _ in range(rng.choices((0, 1, 2, 3, 4, 5), (20, 30, 20, 14, 10, 6))[0]):
            blocks: list[dict[str, Any]] = []
            if rng.random() < 0.3:
                signature = base64.b64encode(rng.randbytes(96)).decode()
                blocks.append(
                    {
                        "type": "thinking",
                        "thinking": self._text(rng.randint(80, 900)),
                        "signature": signature,
                    }
                )
            if rng.random() < 0.6:
                blocks.append({"type": "text", "text": self._text(rng.randint(30, 400))})
            calls = []
            for _ in range(rng.choices((1, 2, 3), (70, 22, 8))[0]):
                block, content, meta, error = self._tool()
                block = {"type": "tool_use", "id": "toolu_01" + self._rand(22), **block}
                blocks.append(block)
                calls.append((block["id"], content, meta, error))
            self.respond(blocks)
            for tool_use_id, content, meta, error in calls:
                result: dict[str, Any] = {
                    "tool_use_id": tool_use_id,
                    "type": "tool_result",
                    "content": content,
                }
                if error:
                    result["is_error"] = True
                self.user([result], tool_use_result=meta)
        if rng.random() < 0.005:
            self.api_error()
        self.respond([{"type": "text", "text": self._text(rng.randint(40, 1200))}])
        if self.agent_id is None:
            self.system("turn_duration", durationMs=rng.randint(2_000, 400_000))
            if rng.random() < 0.01:
                self.system("compact_boundary", compactMetadata={"trigger": "auto"})
                self.parent = None
                self.user(
                    "This session is being continued from a previous conversation. "
                    + self._text(800),
                    extra={"isCompactSummary": True},
                )

    def malformed_line(self) -> None:
        """A line cut short, as a crash mid-write leaves it."""
        if self.lines:
            last = self.lines[-1]
            self.lines.append(last[: max(1, len(last) // 2)])
            self.size += len(self.lines[-1]) + 1
            self.malformed += 1

    def take(self) -> bytes:
        """The lines written so far as file bytes, each ending with a newline."""
        data = b"\n".join(self.lines) + b"\n" if self.lines else b""
        self.lines = []
        return data


# --- corpora -----------------------------------------------------------------------------------


def bench_dir() -> Path:
    return Path(os.environ.get("BENCH_DIR") or "/tmp/session-pipeline-bench")


@dataclass(frozen=True)
class Corpus:
    path: Path
    manifest: dict[str, Any]

    @property
    def bytes(self) -> int:
        return int(self.manifest["bytes"])

    @property
    def files(self) -> int:
        return int(self.manifest["files"])


def _users(n_sessions: int) -> list[str]:
    count = max(3, min(100, n_sessions // 1000))
    users = []
    for i in range(count):
        first = FIRST_NAMES[i % len(FIRST_NAMES)]
        users.append(first if i < len(FIRST_NAMES) else f"{first}{i // len(FIRST_NAMES)}")
    return users


def _target_size(rng: random.Random, i: int, n: int, max_bytes: int, median: int) -> int:
    tail = max(1, n // 10_000)
    stride = max(1, n // tail)
    if i % stride == 0 and i // stride < tail:
        k = i // stride
        return int(max_bytes / 10 ** (k / max(1, tail - 1))) if tail > 1 else max_bytes
    return int(min(max_bytes, max(2_500, rng.lognormvariate(math.log(median), 1.1))))


def _new_writer(
    rng: random.Random, user: str, session_id: str, t0: float, agent_id: str | None = None
) -> _Writer:
    project = rng.choice(PROJECTS)
    return _Writer(
        rng,
        user,
        session_id,
        cwd=f"/home/{user}/src/{project}",
        branch=rng.choice(BRANCHES),
        version=rng.choice(VERSIONS),
        model=rng.choices(MAIN_MODELS, MAIN_MODEL_WEIGHTS)[0]
        if agent_id is None
        else rng.choice(SUBAGENT_MODELS),
        t0=t0,
        agent_id=agent_id,
    )


def _fill(w: _Writer, target: int, malformed_chance: float) -> None:
    bad_at = target * w.rng.random() if w.rng.random() < malformed_chance else -1.0
    while w.size < target:
        w.turn()
        if 0 <= bad_at <= w.size:
            w.malformed_line()
            bad_at = -1.0


def _write_session(
    root: str, seed: int, i: int, n: int, max_bytes: int, median: int, users: list[str]
) -> tuple[int, int, int, int]:
    """Write session `i` and its subagents; return (files, bytes, malformed lines, largest)."""
    rng = random.Random(seed * 1_000_003 + i)
    weights = [1.0 / (k + 1) ** 0.7 for k in range(len(users))]  # a few heavy users
    user = rng.choices(users, weights)[0]
    h = f"{rng.getrandbits(128):032x}"
    session_id = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"
    t0 = 1_785_542_400 + rng.uniform(0, 90 * 86_400)  # Aug-Oct 2026
    w = _new_writer(rng, user, session_id, t0)
    _fill(w, _target_size(rng, i, n, max_bytes, median), malformed_chance=0.02)
    user_dir = os.path.join(root, user)
    os.makedirs(user_dir, exist_ok=True)
    data = w.take()
    with open(os.path.join(user_dir, f"{session_id}.jsonl"), "wb") as f:
        f.write(data)
    files, size, malformed, largest = 1, len(data), w.malformed, len(data)
    for sub in w.subagents[:3]:
        sw = _new_writer(rng, user, session_id, w.t - rng.uniform(30, 600), sub["agent_id"])
        _fill(sw, int(min(max_bytes, max(2_000, rng.lognormvariate(math.log(9_000), 0.9)))), 0.01)
        sub_data = sw.take()
        name = f"agent-{sub['agent_id']}"
        if rng.random() < 0.1:  # the older layout: beside the session, no meta file
            target_dir = user_dir
        else:
            target_dir = os.path.join(user_dir, session_id, "subagents")
            os.makedirs(target_dir, exist_ok=True)
            meta = {"agentType": sub["agentType"], "description": sub["description"]}
            with open(os.path.join(target_dir, f"{name}.meta.json"), "wb") as f:
                f.write(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        with open(os.path.join(target_dir, f"{name}.jsonl"), "wb") as f:
            f.write(sub_data)
        files, size, malformed = files + 1, size + len(sub_data), malformed + sw.malformed
        largest = max(largest, len(sub_data))
    return files, size, malformed, largest


def _write_range(args: tuple[str, int, int, int, int, int, int, list[str]]) -> list[int]:
    root, seed, lo, hi, n, max_bytes, median, users = args
    totals = [0, 0, 0, 0]
    for i in range(lo, hi):
        _add(totals, _write_session(root, seed, i, n, max_bytes, median, users))
    return totals


def _add(totals: list[int], result: Sequence[int]) -> None:
    """Files, bytes and malformed lines add up; the largest file is a maximum."""
    for k in range(3):
        totals[k] += result[k]
    totals[3] = max(totals[3], result[3])


def corpus(
    sessions: int,
    *,
    seed: int = DEFAULT_SEED,
    max_bytes: int = 50 * MB,
    median_bytes: int = 12_000,
    root: Path | None = None,
    workers: int | None = None,
    log: Any = print,
) -> Corpus:
    """The corpus of `sessions` main transcripts (plus their subagents), generated once."""
    root = root or bench_dir()
    name = f"corpus-v{GENERATOR_VERSION}-s{seed}-n{sessions}-med{median_bytes}-max{max_bytes}"
    path = root / name
    manifest_path = root / f"{name}.json"
    if manifest_path.exists() and path.is_dir():
        return Corpus(path, orjson.loads(manifest_path.read_bytes()))
    tmp = root / f"{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.mkdir(parents=True)
    users = _users(sessions)
    started = time.monotonic()
    step = 250
    jobs = [
        (str(tmp), seed, lo, min(sessions, lo + step), sessions, max_bytes, median_bytes, users)
        for lo in range(0, sessions, step)
    ]
    totals = [0, 0, 0, 0]
    workers = workers or os.cpu_count() or 1
    log(f"generating {sessions} sessions (max {max_bytes / MB:g} MB) into {path} ...")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done, result in enumerate(pool.map(_write_range, jobs), 1):
            _add(totals, result)
            if done % 40 == 0:
                log(f"  {done * step} sessions, {totals[1] / MB:.0f} MB")
    tmp.rename(path)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sessions": sessions,
        "max_bytes": max_bytes,
        "median_target_bytes": median_bytes,
        "users": len(users),
        "files": totals[0],
        "bytes": totals[1],
        "malformed_lines": totals[2],
        "largest_file": totals[3],
        "generated_in_seconds": round(time.monotonic() - started, 1),
    }
    manifest_path.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    log(
        f"  done: {totals[0]} files, {totals[1] / MB:.0f} MB in "
        f"{manifest['generated_in_seconds']} s"
    )
    return Corpus(path, manifest)


# --- one big session -------------------------------------------------------------------------


def big_session(path: Path, size_bytes: int, *, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Write one transcript of about `size_bytes` (complete lines, at least that many bytes),
    streamed to disk in a few-MB buffer. Returns what `append_lines` needs to continue it."""
    rng = random.Random(seed * 7 + size_bytes)
    session_id = "5e55b16a-0000-4000-a000-" + f"{size_bytes:012d}"[-12:]
    w = _new_writer(rng, "alice", session_id, 1_785_542_400.0)
    written = 0
    tmp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        while written + w.size < size_bytes:
            w.turn()
            if w.rng.random() < 0.001:
                w.malformed_line()
            if w.size > 4 * MB:
                data = w.take()
                f.write(data)
                written += len(data)
                w.size = 0
        data = w.take()
        f.write(data)
        written += len(data)
    tmp.rename(path)
    return {
        "session_id": session_id,
        "bytes": written,
        "cwd": w.cwd,
        "model": w.model,
        "end": w.t,
        "base": w.base,
        "parent": w.parent,
        "seed": seed,
    }


def cached_big_session(size_bytes: int, *, seed: int = DEFAULT_SEED) -> tuple[Path, dict[str, Any]]:
    root = bench_dir()
    path = root / f"big-v{GENERATOR_VERSION}-s{seed}-{size_bytes}.jsonl"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        return path, orjson.loads(meta_path.read_bytes())
    meta = big_session(path, size_bytes, seed=seed)
    meta_path.write_bytes(orjson.dumps(meta))
    return path, meta


def append_lines(
    meta: dict[str, Any], nbytes: int = 1024, *, round_no: int = 0, prompt: bool = True
) -> bytes:
    """`nbytes` of complete lines continuing the session `meta` describes: a prompt and a
    streamed answer when they fit (and `prompt`), else one answer line, padded with text to
    the size asked."""
    rng = random.Random(f"{meta['seed']}:{meta['session_id']}:append:{round_no}")
    w = _Writer(
        rng,
        "alice",
        meta["session_id"],
        cwd=meta["base"]["cwd"],
        branch=meta["base"]["gitBranch"],
        version=meta["base"]["version"],
        model=meta["model"],
        t0=meta["end"] + 60,
    )
    filler = " ".join(_WORDS) * (1 + nbytes // 500)

    def build(pad: int, prompt: bool) -> bytes:
        w.lines, w.size, w.parent = [], 0, meta["parent"]
        if prompt:
            w.user("One more thing: " + filler[:pad])
            pad = 0
        w.respond([{"type": "text", "text": "Done. " + filler[:pad]}])
        return w.take()

    prompt = prompt and len(build(0, prompt=True)) <= nbytes
    pad = 0
    for _ in range(12):  # token counts and timestamps vary in width: converge on the size
        data = build(pad, prompt)
        if len(data) == nbytes:
            break
        pad = max(0, pad + nbytes - len(data))
    return data


def session_meta(path: Path, *, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """What `append_lines` needs to continue the transcript at `path` (a main session file,
    named by its sessionId), taken from its last complete lines that carry them."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (64 << 10)))
        tail = f.read()
    base: dict[str, Any] = {"cwd": "/home/user/src", "gitBranch": "main", "version": "2.1.31"}
    meta: dict[str, Any] = {
        "session_id": path.stem,
        "model": SONNET,
        "end": 1_785_542_400.0,
        "parent": None,
        "seed": seed,
        "base": base,
    }
    for raw in reversed(tail.split(b"\n")):
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(line, dict) or "uuid" not in line or "timestamp" not in line:
            continue
        meta["parent"] = line["uuid"]
        meta["end"] = _epoch(line["timestamp"])
        for key in base:
            if isinstance(line.get(key), str):
                base[key] = line[key]
        model = (line.get("message") or {}).get("model")
        if isinstance(model, str) and model.startswith("claude-"):
            meta["model"] = model
        break
    return meta


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def late_tool_result(source: Path, meta: dict[str, Any]) -> bytes:
    """A user line answering, with an error, the first tool call of the session at `source`:
    appended to a big session it touches an entry the last read's checkpoint no longer keeps,
    so the next read of the file needs the whole-read fallback (`WholeReadNeeded`)."""
    with open(source, "rb") as f:
        head = f.read(8 * MB)
    found = re.search(rb'"type":"tool_use","id":"([^"]+)"', head)
    if found is None:
        raise ValueError(f"no tool call in the first 8 MB of {source}")
    line = {
        "parentUuid": meta["parent"],
        "isSidechain": False,
        "userType": "external",
        "cwd": meta["base"]["cwd"],
        "sessionId": meta["session_id"],
        "version": meta["base"]["version"],
        "gitBranch": meta["base"]["gitBranch"],
        "type": "user",
        "message": {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": found.group(1).decode(),
                    "content": "late failure",
                    "is_error": True,
                }
            ],
        },
        "uuid": "1a7e0000-0000-4000-a000-000000000001",
        "timestamp": _iso(meta["end"] + 60),
    }
    return orjson.dumps(line) + b"\n"


def iter_files(root: Path) -> Iterator[str]:
    """Every `.jsonl` under `root` in the pipeline's layout (for baselines that read files)."""
    for user in os.scandir(root):
        if not user.is_dir():
            continue
        for entry in os.scandir(user.path):
            if entry.name.endswith(".jsonl"):
                yield entry.path
            elif entry.is_dir():
                sub = os.path.join(entry.path, "subagents")
                if os.path.isdir(sub):
                    for s in os.scandir(sub):
                        if s.name.endswith(".jsonl"):
                            yield s.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=0)
    parser.add_argument("--max-mb", type=float, default=50)
    parser.add_argument("--median-kb", type=float, default=12)
    parser.add_argument("--big-mb", type=float, default=0)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    if args.sessions:
        c = corpus(
            args.sessions,
            seed=args.seed,
            max_bytes=int(args.max_mb * MB),
            median_bytes=int(args.median_kb * 1000),
        )
        print(c.path, orjson.dumps(c.manifest).decode())
    if args.big_mb:
        path, meta = cached_big_session(int(args.big_mb * MB), seed=args.seed)
        print(path, meta["bytes"])


if __name__ == "__main__":
    main()
