"""Generate the sample Claude Code transcripts under examples/sessions/.

Deterministic (every random choice comes from a `random.Random` seeded by the session id,
timestamps are fixed in November 2026) and stdlib only:

    python examples/make_sessions.py          # (re)write examples/sessions/{alice,bob,carol}
    python examples/make_sessions.py --check  # only validate and print the expected facts

The samples follow /work/shared/reference/claude-code-jsonl.md, including its traps:
streamed responses (one line per content block, same message.id/requestId), subagent
transcripts under <session>/subagents/, a resumed session that copies an earlier one, a
compaction, typed slash commands, an API error line, skipped line types and one malformed line.
After writing, the script runs the same check as `--check`.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import shutil
import string
import sys
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

OUT = Path(__file__).resolve().parent / "sessions"
USERS = ("alice", "bob", "carol")

SONNET = "claude-sonnet-4-5-20250929"
OPUS = "claude-opus-4-5-20251101"
HAIKU = "claude-haiku-4-5-20251001"

ALNUM = string.ascii_letters + string.digits
SHARED_SYSTEM_PROMPT_TOKENS = 11_904  # cached across sessions, so even a first call reads it


def ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def numbered(text: str, start: int = 1) -> str:
    """The Read tool's `cat -n` style output."""
    return "\n".join(f"{i:>6}→{line}" for i, line in enumerate(text.split("\n"), start))


# Content block constructors (tool_use ids are assigned by Transcript.respond).
def text(s: str) -> dict:
    return {"type": "text", "text": s}


def thinking(s: str) -> dict:
    return {"type": "thinking", "thinking": s}


def tool(name: str, **inp) -> dict:
    return {"type": "tool_use", "name": name, "input": inp}


class Transcript:
    """One JSONL file being written: keeps the parentUuid chain, the clock and a plausible
    prompt-cache state so token numbers grow the way real ones do."""

    def __init__(
        self,
        user: str,
        session_id: str,
        *,
        cwd: str,
        branch: str,
        version: str,
        start: datetime,
        agent_id: str | None = None,
        cache_ttl: str = "5m",
    ) -> None:
        self.username = user
        self.session_id = session_id
        self.cwd = cwd
        self.branch = branch
        self.version = version
        self.t = start
        self.agent_id = agent_id
        self.cache_ttl = cache_ttl
        self.rng = random.Random(f"{session_id}:{agent_id or 'main'}")
        self.lines: list[dict | str] = []
        self.parent: str | None = None
        self.cached = 0 if agent_id else SHARED_SYSTEM_PROMPT_TOKENS
        self.pending_chars = 4_000 if agent_id else 9_000  # tools + CLAUDE.md on the 1st call
        self.last_model: str | None = None
        self.turn_start = start

    # ---- ids and clock -------------------------------------------------------------------
    def new_uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _rand(self, n: int) -> str:
        return "".join(self.rng.choice(ALNUM) for _ in range(n))

    def advance(self, lo: float, hi: float) -> None:
        self.t += timedelta(milliseconds=self.rng.randint(int(lo * 1000), int(hi * 1000)))

    @property
    def path(self) -> Path:
        if self.agent_id:
            folder = OUT / self.username / self.session_id / "subagents"
            return folder / f"agent-{self.agent_id}.jsonl"
        return OUT / self.username / f"{self.session_id}.jsonl"

    def _common(self, kind: str, parent: str | None) -> dict:
        d = {
            "parentUuid": parent,
            "isSidechain": self.agent_id is not None,
            "userType": "external",
            "cwd": self.cwd,
            "sessionId": self.session_id,
            "version": self.version,
            "gitBranch": self.branch,
        }
        if self.agent_id:
            d["agentId"] = self.agent_id
        d["type"] = kind
        return d

    # ---- user side -----------------------------------------------------------------------
    def user(
        self,
        content: str | list,
        *,
        meta: bool = False,
        tool_use_result=None,
        uid: str | None = None,
        parent: str | bool | None = True,
        extra: dict | None = None,
        delay: tuple[float, float] = (0.3, 2.0),
    ) -> str:
        self.advance(*delay)
        uid = uid or self.new_uuid()
        d = self._common("user", self.parent if parent is True else parent)
        d["message"] = {"role": "user", "content": content}
        if meta:
            d["isMeta"] = True
        if extra:
            d.update(extra)
        d["uuid"] = uid
        d["timestamp"] = ts(self.t)
        if tool_use_result is not None:
            d["toolUseResult"] = tool_use_result
        self.lines.append(d)
        self.parent = uid
        self.pending_chars += len(json.dumps(content))
        return uid

    def prompt(self, content: str | list, think: tuple[float, float] = (20, 90)) -> str:
        """A prompt typed by the user, preceded by its file-history-snapshot."""
        self.advance(*think)
        uid = self.new_uuid()
        self.lines.append(
            {
                "type": "file-history-snapshot",
                "messageId": uid,
                "snapshot": {"messageId": uid, "trackedFileBackups": {}, "timestamp": ts(self.t)},
                "isSnapshotUpdate": False,
            }
        )
        self.turn_start = self.t
        return self.user(content, uid=uid, delay=(0.0, 0.05))

    def result(self, tool_use_id: str, content, tur, *, is_error: bool = False) -> str:
        block = {"tool_use_id": tool_use_id, "type": "tool_result", "content": content}
        if is_error:
            block["is_error"] = True
        return self.user([block], tool_use_result=tur, delay=(0.2, 4.0))

    # ---- assistant side ------------------------------------------------------------------
    def _usage(self, model: str, out_chars: int) -> tuple[dict, int, int]:
        creation = 80 + self.pending_chars // 4 + self.rng.randint(0, 90)
        read = self.cached
        if self.last_model is not None and model != self.last_model:
            creation += self.cached  # prompt cache is per model: a switch rewrites it all
            read = 0
        self.cached = read + creation
        self.last_model = model
        self.pending_chars = 0
        ttl_5m, ttl_1h = (creation, 0) if self.cache_ttl == "5m" else (0, creation)
        usage = {
            "input_tokens": self.rng.choice([3, 4, 5, 6, 8, 9, 10]),
            "cache_creation_input_tokens": creation,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": ttl_5m,
                "ephemeral_1h_input_tokens": ttl_1h,
            },
            "output_tokens": 0,
            "service_tier": "standard",
        }
        final_out = max(12, out_chars // 4 + self.rng.randint(8, 60))
        placeholder = self.rng.choice([1, 2, 3, 5, 8])
        return usage, placeholder, final_out

    def respond(self, model: str, *blocks: dict, think: tuple[float, float] = (2, 12)) -> list:
        """One API response, written the way Claude Code streams it: one line per content
        block, all repeating message.id, requestId and usage; only the last line has the
        stop_reason and the full output_tokens. Returns the tool_use ids, in order."""
        msg_id = "msg_01" + self._rand(22)
        req_id = "req_011C" + self._rand(20)
        blocks = [copy.deepcopy(b) for b in blocks]
        ids = []
        for i, b in enumerate(blocks):
            if b["type"] == "tool_use":
                ids.append("toolu_01" + self._rand(22))
                blocks[i] = {
                    "type": "tool_use",
                    "id": ids[-1],
                    "name": b["name"],
                    "input": b["input"],
                }
            elif b["type"] == "thinking":
                b["signature"] = base64.b64encode(self.rng.randbytes(96)).decode()
        out_chars = sum(
            len(b.get("text", ""))
            + len(b.get("thinking", ""))
            + (len(json.dumps(b["input"])) if "input" in b else 0)
            for b in blocks
        )
        usage, placeholder, final_out = self._usage(model, out_chars)
        stop = "tool_use" if ids else "end_turn"
        self.advance(*think)
        for i, b in enumerate(blocks):
            last = i == len(blocks) - 1
            u = dict(usage, cache_creation=dict(usage["cache_creation"]))
            u["output_tokens"] = final_out if last else placeholder
            d = self._common("assistant", self.parent)
            d["message"] = {
                "model": model,
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "content": [b],
                "stop_reason": stop if last else None,
                "stop_sequence": None,
                "usage": u,
            }
            d["requestId"] = req_id
            d["uuid"] = self.new_uuid()
            d["timestamp"] = ts(self.t)
            self.lines.append(d)
            self.parent = d["uuid"]
            self.advance(0.4, 3.0)
        self.pending_chars += out_chars
        return ids

    def api_error(self, message: str) -> None:
        """What Claude Code writes when the API call fails after its retries."""
        self.advance(30, 60)
        d = self._common("assistant", self.parent)
        d["message"] = {
            "id": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            "container": None,
            "model": "<synthetic>",
            "role": "assistant",
            "stop_reason": "stop_sequence",
            "stop_sequence": "",
            "type": "message",
            "usage": {
                "input_tokens": 0,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
                "service_tier": None,
                "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
            },
            "content": [{"type": "text", "text": message}],
        }
        d["uuid"] = self.new_uuid()
        d["timestamp"] = ts(self.t)
        d["isApiErrorMessage"] = True
        self.lines.append(d)
        self.parent = d["uuid"]

    # ---- other line types ----------------------------------------------------------------
    def system(self, subtype: str, *, parent: str | bool | None = True, **fields) -> str:
        self.advance(0.05, 0.5)
        d = self._common("system", self.parent if parent is True else parent)
        d["subtype"] = subtype
        d.update(fields)
        d["isMeta"] = False
        d["timestamp"] = ts(self.t)
        d["uuid"] = self.new_uuid()
        self.lines.append(d)
        return d["uuid"]

    def turn_done(self) -> None:
        ms = int((self.t - self.turn_start).total_seconds() * 1000) + self.rng.randint(100, 900)
        self.system("turn_duration", durationMs=ms)

    def queue(self, operation: str, content: str | None = None) -> None:
        self.advance(0.5, 6)
        d = {"type": "queue-operation", "operation": operation, "timestamp": ts(self.t)}
        d["sessionId"] = self.session_id
        if content is not None:
            d["content"] = content
        self.lines.append(d)

    def raw(self, line: dict | str) -> None:
        self.lines.append(line)

    def copy_conversation_from(self, other: Transcript) -> None:
        """What a resumed session starts with: the earlier conversation's user/assistant
        lines, verbatim except for the new sessionId."""
        for line in other.lines:
            if isinstance(line, dict) and line.get("type") in ("user", "assistant"):
                c = copy.deepcopy(line)
                c["sessionId"] = self.session_id
                self.lines.append(c)
                self.parent = c["uuid"]

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", encoding="utf-8", newline="\n") as f:
            for line in self.lines:
                if isinstance(line, str):
                    f.write(line + "\n")
                else:
                    f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")


def at(day: int, hh: int, mm: int, ss: int) -> datetime:
    return datetime(2026, 11, day, hh, mm, ss, tzinfo=UTC)


# ======================================================================================
# alice: payments-api, Sonnet. A1 fixes a failing test; A2 resumes A1 and writes a migration.
# ======================================================================================
ALICE_CWD = "/home/alice/src/payments-api"
A1_ID = "3f6c2a1e-8b4d-4c71-9e2a-5d0b7f1c9a43"
A2_ID = "b8e41d07-2c5f-4a9e-8f13-6a7d2e0c4b95"

TEST_REFUNDS = """from decimal import Decimal

from payments.models import Charge
from payments.refunds import compute_refund


def test_full_refund():
    charge = Charge(id="ch_122", amount=Decimal("19.99"), currency="EUR")
    assert compute_refund(charge, fraction=Decimal(1)) == Decimal("19.99")


def test_partial_refund_rounding():
    charge = Charge(id="ch_123", amount=Decimal("5.35"), currency="EUR")
    # half a cent goes to the customer: 2.675 -> 2.68
    assert compute_refund(charge, fraction=Decimal("0.5")) == Decimal("2.68")"""

REFUNDS_PY = '''from decimal import ROUND_HALF_UP, Decimal

from payments.models import Charge

CENT = Decimal("0.01")


def compute_refund(charge: Charge, fraction: Decimal) -> Decimal:
    """Amount to refund for `fraction` of a charge, rounded half-up to the cent."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    amount = round(float(charge.amount) * float(fraction), 2)
    return Decimal(str(amount)).quantize(CENT, rounding=ROUND_HALF_UP)'''

PYTEST_FAIL = """Exit code 1
.F                                                                       [100%]
=================================== FAILURES ===================================
_________________________ test_partial_refund_rounding _________________________

    def test_partial_refund_rounding():
        charge = Charge(id="ch_123", amount=Decimal("5.35"), currency="EUR")
        # half a cent goes to the customer: 2.675 -> 2.68
>       assert compute_refund(charge, fraction=Decimal("0.5")) == Decimal("2.68")
E       AssertionError: assert Decimal('2.67') == Decimal('2.68')
E        +  where Decimal('2.67') = compute_refund(Charge(id='ch_123', amount=Decimal('5.35'), \
currency='EUR'), fraction=Decimal('0.5'))

tests/test_refunds.py:15: AssertionError
=========================== short test summary info ============================
FAILED tests/test_refunds.py::test_partial_refund_rounding - AssertionError: assert \
Decimal('2.67') == Decimal('2.68')
1 failed, 1 passed in 0.09s"""

OLD_LINES = """    amount = round(float(charge.amount) * float(fraction), 2)
    return Decimal(str(amount)).quantize(CENT, rounding=ROUND_HALF_UP)"""
NEW_LINES = """    # Decimal all the way: float(5.35) * 0.5 is 2.67499999..., which rounds to 2.67.
    return (charge.amount * fraction).quantize(CENT, rounding=ROUND_HALF_UP)"""


def alice_a1() -> Transcript:
    s = Transcript(
        "alice",
        A1_ID,
        cwd=ALICE_CWD,
        branch="fix/refund-rounding",
        version="2.1.3",
        start=at(3, 9, 14, 7),
    )
    s.prompt(
        "tests/test_refunds.py::test_partial_refund_rounding started failing after I merged "
        "main this morning. Can you figure out why and fix it? Don't change the test, the "
        "expected value is what finance signed off on.",
        think=(0, 0),
    )
    read_id, grep_id = s.respond(
        SONNET,
        thinking(
            "The user says a rounding test broke after merging main. I should look at the test "
            "and at compute_refund. Let me read the test file and find where compute_refund is "
            "defined in parallel."
        ),
        text("I'll start by looking at the failing test and where `compute_refund` lives."),
        tool("Read", file_path=f"{ALICE_CWD}/tests/test_refunds.py"),
        tool(
            "Grep",
            pattern="def compute_refund",
            path=f"{ALICE_CWD}/src",
            output_mode="files_with_matches",
        ),
    )
    s.result(
        read_id,
        numbered(TEST_REFUNDS),
        {
            "type": "text",
            "file": {
                "filePath": f"{ALICE_CWD}/tests/test_refunds.py",
                "content": TEST_REFUNDS,
                "numLines": 15,
                "startLine": 1,
                "totalLines": 15,
            },
        },
    )
    s.result(
        grep_id,
        "Found 1 file\nsrc/payments/refunds.py",
        {
            "mode": "files_with_matches",
            "filenames": ["src/payments/refunds.py"],
            "numFiles": 1,
        },
    )
    (read2,) = s.respond(SONNET, tool("Read", file_path=f"{ALICE_CWD}/src/payments/refunds.py"))
    s.result(
        read2,
        numbered(REFUNDS_PY),
        {
            "type": "text",
            "file": {
                "filePath": f"{ALICE_CWD}/src/payments/refunds.py",
                "content": REFUNDS_PY,
                "numLines": 13,
                "startLine": 1,
                "totalLines": 13,
            },
        },
    )
    (bash1,) = s.respond(
        SONNET,
        text(
            "`compute_refund` goes through `float` before rounding. Let me confirm that's "
            "what the test trips on."
        ),
        tool(
            "Bash",
            command="python -m pytest tests/test_refunds.py -x -q",
            description="Run the refund tests",
        ),
    )
    s.result(bash1, PYTEST_FAIL, "Error: " + PYTEST_FAIL, is_error=True)
    (edit_id,) = s.respond(
        SONNET,
        thinking(
            "float(5.35) is 5.3499999999999996447..., times 0.5 gives 2.67499999..., and "
            "round(..., 2) yields 2.67. Converting back with Decimal(str(...)) cannot recover "
            "the lost half cent. The fix is to keep the arithmetic in Decimal and quantize "
            "once with ROUND_HALF_UP. fraction is already typed as Decimal."
        ),
        text(
            "Found it. The merge brought in `round(float(...) * float(...), 2)`: `float(5.35)` "
            "is `5.349999...`, so half of it is `2.674999...` and rounds down to `2.67` before "
            "`ROUND_HALF_UP` ever sees it. Keeping the arithmetic in `Decimal` fixes it."
        ),
        tool(
            "Edit",
            file_path=f"{ALICE_CWD}/src/payments/refunds.py",
            old_string=OLD_LINES,
            new_string=NEW_LINES,
        ),
    )
    s.result(
        edit_id,
        f"The file {ALICE_CWD}/src/payments/refunds.py has been updated. Here's the result of "
        "running `cat -n` on a snippet of the edited file:\n" + numbered(NEW_LINES, 12),
        {
            "filePath": f"{ALICE_CWD}/src/payments/refunds.py",
            "oldString": OLD_LINES,
            "newString": NEW_LINES,
            "replaceAll": False,
            "userModified": False,
            "structuredPatch": [
                {
                    "oldStart": 12,
                    "oldLines": 2,
                    "newStart": 12,
                    "newLines": 2,
                    "lines": ["-" + x for x in OLD_LINES.split("\n")]
                    + ["+" + x for x in NEW_LINES.split("\n")],
                }
            ],
        },
    )
    (bash2,) = s.respond(
        SONNET,
        tool("Bash", command="python -m pytest tests/ -q", description="Run the full test suite"),
    )
    # Alice types her next question while the suite is running: it is queued.
    s.queue("enqueue", "Are there other places that round money through float() like that?")
    out = "........................................................ [100%]\n56 passed in 1.84s"
    s.result(bash2, out, {"stdout": out, "stderr": "", "interrupted": False, "isImage": False})
    s.respond(
        SONNET,
        text(
            "Fixed. `compute_refund` now multiplies `Decimal`s and quantizes once with "
            "`ROUND_HALF_UP`, so 5.35 × 0.5 = 2.675 → **2.68** as the test expects. The full "
            "suite passes (56 tests).\n\nThe regression came from the float round-trip added "
            "on main; the test was right."
        ),
    )
    s.turn_done()
    s.queue("dequeue")
    s.prompt("Are there other places that round money through float() like that?", think=(0, 1))
    (grep2,) = s.respond(
        SONNET,
        tool(
            "Grep",
            pattern=r"float\(",
            path=f"{ALICE_CWD}/src",
            output_mode="content",
            **{"-n": True},
        ),
    )
    hits = (
        "src/payments/fees.py:14:    return round(float(amount) * FEE_RATE, 2)\n"
        'src/payments/fx.py:27:    rate = float(quote["rate"])'
    )
    s.result(
        grep2,
        hits,
        {"mode": "content", "numFiles": 0, "filenames": [], "content": hits, "numLines": 2},
    )
    s.respond(
        SONNET,
        text(
            "Two more:\n\n- `src/payments/fees.py:14` — `round(float(amount) * FEE_RATE, 2)` "
            "has exactly the same bug and can be a cent off on fees.\n- `src/payments/fx.py:27`"
            " — the FX rate is parsed as `float`. Rates aren't money, but the result is "
            'multiplied into amounts later, so it should be `Decimal(quote["rate"])` too.\n\n'
            "Want me to fix both in this branch?"
        ),
    )
    s.turn_done()
    return s


MIGRATION_0008 = '''"""charges.currency NOT NULL

Revision ID: 0008_charge_currency
Revises: 0007_add_refunds
Create Date: 2026-10-21 11:02:45
"""
import sqlalchemy as sa
from alembic import op

revision = "0008_charge_currency"
down_revision = "0007_add_refunds"


def upgrade() -> None:
    op.execute("UPDATE charges SET currency = 'EUR' WHERE currency IS NULL")
    op.alter_column("charges", "currency", existing_type=sa.String(3), nullable=False)


def downgrade() -> None:
    op.alter_column("charges", "currency", existing_type=sa.String(3), nullable=True)'''

MIGRATION_0009 = '''"""refunds.amount FLOAT -> NUMERIC(12,2)

Revision ID: 0009_refund_amount_numeric
Revises: 0008_charge_currency
Create Date: 2026-11-03 14:09:12
"""
import sqlalchemy as sa
from alembic import op

revision = "0009_refund_amount_numeric"
down_revision = "0008_charge_currency"


def upgrade() -> None:
    # float8 -> numeric yields the shortest exact decimal (PostgreSQL >= 12), so a stored
    # 2.675 becomes 2.675 and rounds half-up to 2.68 instead of truncating to 2.67.
    op.alter_column(
        "refunds",
        "amount",
        existing_type=sa.Float(),
        type_=sa.Numeric(12, 2),
        postgresql_using="round(amount::numeric, 2)",
    )


def downgrade() -> None:
    op.alter_column(
        "refunds",
        "amount",
        existing_type=sa.Numeric(12, 2),
        type_=sa.Float(),
        postgresql_using="amount::double precision",
    )'''

COMPACT_SUMMARY = """This session is being continued from a previous conversation that ran out of \
context. The conversation is summarized below:
Analysis:
The user first asked to fix a failing rounding test, then to write a migration.

Summary:
1. Primary Request and Intent:
   - Fix tests/test_refunds.py::test_partial_refund_rounding without changing the test (done: \
compute_refund now uses Decimal arithmetic and ROUND_HALF_UP).
   - Write an Alembic migration changing refunds.amount from FLOAT to NUMERIC(12,2) while \
backfilling existing rows without losing cents (done).
2. Key Technical Concepts: Decimal vs float rounding, ROUND_HALF_UP, Alembic alter_column with \
postgresql_using, PostgreSQL float8->numeric casts.
3. Files and Code Sections:
   - src/payments/refunds.py: compute_refund returns (charge.amount * fraction).quantize(CENT, \
rounding=ROUND_HALF_UP)
   - migrations/versions/0009_refund_amount_numeric.py: upgrade uses \
round(amount::numeric, 2); downgrade casts back to double precision.
4. Errors and fixes: the refund test failed with Decimal('2.67') != Decimal('2.68') because \
of a float round-trip.
5. Pending Tasks: fees.py:14 and fx.py:27 still use float (user has not asked to fix them).
6. Current Work: the migration was verified with upgrade/downgrade/upgrade on the local DB.
Please continue the conversation from where we left it off without asking the user any \
further questions."""

TEST_MIGRATIONS = """import pytest
from alembic import command
from sqlalchemy import text


@pytest.mark.db
def test_0009_upgrade_downgrade(alembic_config, engine):
    command.upgrade(alembic_config, "0009_refund_amount_numeric")
    command.downgrade(alembic_config, "0008_charge_currency")"""

TEST_MIGRATIONS_ADD = '''

@pytest.mark.db
def test_0009_backfill_keeps_half_cents(alembic_config, engine):
    command.upgrade(alembic_config, "0008_charge_currency")
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO refunds (id, charge_id, amount) VALUES ('rf_1', 'ch_1', 2.675)")
        )
    command.upgrade(alembic_config, "0009_refund_amount_numeric")
    with engine.begin() as conn:
        amount = conn.execute(text("SELECT amount FROM refunds WHERE id = 'rf_1'")).scalar_one()
    assert str(amount) == "2.68"'''


def alice_a2(a1: Transcript) -> Transcript:
    s = Transcript(
        "alice",
        A2_ID,
        cwd=ALICE_CWD,
        branch="fix/refund-rounding",
        version="2.1.3",
        start=at(3, 14, 2, 31),
    )
    last_a1 = [x for x in a1.lines if isinstance(x, dict) and x["type"] in ("user", "assistant")]
    s.raw(
        {
            "type": "summary",
            "summary": "Fix partial refund rounding (float round-trip)",
            "leafUuid": last_a1[-1]["uuid"],
        }
    )
    s.copy_conversation_from(a1)
    # the copied requests are already in the model's cache when the session resumes
    s.pending_chars = sum(len(json.dumps(x["message"]["content"])) for x in last_a1)

    s.prompt(
        "Now write the Alembic migration that changes refunds.amount from FLOAT to "
        "NUMERIC(12,2). It has to backfill the existing rows without losing cents.",
        think=(5, 10),
    )
    glob_id, read_id = s.respond(
        SONNET,
        thinking(
            "I need the current head revision to set down_revision, and the migration naming "
            "convention. Glob the versions folder and read alembic.ini's script_location is "
            "probably unnecessary; read the latest migration instead once I know its name. "
            "Actually I can read env.py-independent info: glob first, and read the model to "
            "confirm the column type."
        ),
        text("Let me check the existing migrations and the current column definition."),
        tool("Glob", pattern="migrations/versions/*.py"),
        tool("Read", file_path=f"{ALICE_CWD}/src/payments/models.py", offset=40, limit=12),
    )
    files = [
        "migrations/versions/0006_initial.py",
        "migrations/versions/0007_add_refunds.py",
        "migrations/versions/0008_charge_currency.py",
    ]
    s.result(
        glob_id,
        "\n".join(f"{ALICE_CWD}/{f}" for f in files),
        {
            "filenames": [f"{ALICE_CWD}/{f}" for f in files],
            "durationMs": 14,
            "numFiles": 3,
            "truncated": False,
        },
    )
    model_src = (
        'class Refund(Base):\n    __tablename__ = "refunds"\n\n'
        "    id: Mapped[str] = mapped_column(String(32), primary_key=True)\n"
        '    charge_id: Mapped[str] = mapped_column(ForeignKey("charges.id"))\n'
        "    amount: Mapped[float] = mapped_column(Float, nullable=False)\n"
        "    created_at: Mapped[datetime] = mapped_column(server_default=func.now())"
    )
    s.result(
        read_id,
        numbered(model_src, 40),
        {
            "type": "text",
            "file": {
                "filePath": f"{ALICE_CWD}/src/payments/models.py",
                "content": model_src,
                "numLines": 7,
                "startLine": 40,
                "totalLines": 88,
            },
        },
    )
    (read3,) = s.respond(
        SONNET, tool("Read", file_path=f"{ALICE_CWD}/migrations/versions/0008_charge_currency.py")
    )
    s.result(
        read3,
        numbered(MIGRATION_0008),
        {
            "type": "text",
            "file": {
                "filePath": f"{ALICE_CWD}/migrations/versions/0008_charge_currency.py",
                "content": MIGRATION_0008,
                "numLines": 21,
                "startLine": 1,
                "totalLines": 21,
            },
        },
    )
    path9 = f"{ALICE_CWD}/migrations/versions/0009_refund_amount_numeric.py"
    (write_id,) = s.respond(
        SONNET,
        text(
            "Head is `0008_charge_currency`. A plain `ALTER ... TYPE numeric(12,2)` would round "
            "the binary float (2.67499...) and lose the half cent, so I'll cast through "
            "`numeric` first and round explicitly in `USING`."
        ),
        tool("Write", file_path=path9, content=MIGRATION_0009),
    )
    s.result(
        write_id,
        f"File created successfully at: {path9}",
        {"type": "create", "filePath": path9, "content": MIGRATION_0009, "structuredPatch": []},
    )
    (bash_id,) = s.respond(
        SONNET,
        tool(
            "Bash",
            command="alembic upgrade head && alembic downgrade -1 && alembic upgrade head",
            description="Check the migration upgrades and downgrades cleanly",
        ),
    )
    out = (
        "INFO  [alembic.runtime.migration] Context impl PostgresqlImpl.\n"
        "INFO  [alembic.runtime.migration] Will assume transactional DDL.\n"
        "INFO  [alembic.runtime.migration] Running upgrade 0008_charge_currency -> "
        "0009_refund_amount_numeric, refunds.amount FLOAT -> NUMERIC(12,2)\n"
        "INFO  [alembic.runtime.migration] Running downgrade 0009_refund_amount_numeric -> "
        "0008_charge_currency, refunds.amount FLOAT -> NUMERIC(12,2)\n"
        "INFO  [alembic.runtime.migration] Running upgrade 0008_charge_currency -> "
        "0009_refund_amount_numeric, refunds.amount FLOAT -> NUMERIC(12,2)"
    )
    s.result(bash_id, out, {"stdout": "", "stderr": out, "interrupted": False, "isImage": False})
    s.respond(
        SONNET,
        text(
            "Added `migrations/versions/0009_refund_amount_numeric.py`:\n\n- **upgrade**: "
            "`ALTER COLUMN amount TYPE NUMERIC(12,2) USING round(amount::numeric, 2)` — the "
            "`::numeric` cast keeps `2.675` as `2.675`, so the backfill rounds it to `2.68`.\n"
            "- **downgrade**: casts back to `double precision`.\n\nUpgrade → downgrade → "
            "upgrade runs cleanly on the local database. You'll also want to change "
            "`Refund.amount` to `Mapped[Decimal]` / `Numeric(12, 2)` in `models.py`."
        ),
    )
    s.turn_done()

    # /compact typed by the user: boundary, summary (a new root), then the command itself.
    s.advance(40, 90)
    s.system(
        "compact_boundary",
        parent=None,
        content="Conversation compacted",
        logicalParentUuid=s.parent,
        level="info",
        compactMetadata={"trigger": "manual", "preTokens": s.cached + 2_000},
    )
    s.user(
        COMPACT_SUMMARY,
        parent=None,
        delay=(0.1, 0.3),
        extra={"isVisibleInTranscriptOnly": True, "isCompactSummary": True},
    )
    s.user(
        "<command-name>/compact</command-name>\n            <command-message>compact"
        "</command-message>\n            <command-args></command-args>",
        delay=(0.0, 0.1),
    )
    s.user(
        "<local-command-stdout>Compacted (ctrl+o to see full summary)</local-command-stdout>",
        delay=(0.0, 0.1),
    )
    s.cached = SHARED_SYSTEM_PROMPT_TOKENS  # the compacted conversation is a new cache prefix
    s.pending_chars = len(COMPACT_SUMMARY) + 9_000

    s.prompt("Add a test that a stored 2.675 comes out of the migration as 2.68.")
    test_path = f"{ALICE_CWD}/tests/test_migrations.py"
    (read4,) = s.respond(SONNET, tool("Read", file_path=test_path))
    s.result(
        read4,
        numbered(TEST_MIGRATIONS),
        {
            "type": "text",
            "file": {
                "filePath": test_path,
                "content": TEST_MIGRATIONS,
                "numLines": 9,
                "startLine": 1,
                "totalLines": 9,
            },
        },
    )
    last_line = '    command.downgrade(alembic_config, "0008_charge_currency")'
    (edit_id,) = s.respond(
        SONNET,
        tool(
            "Edit",
            file_path=test_path,
            old_string=last_line,
            new_string=last_line + TEST_MIGRATIONS_ADD,
        ),
    )
    s.result(
        edit_id,
        f"The file {test_path} has been updated. Here's the result of running "
        "`cat -n` on a snippet of the edited file:\n"
        + numbered(last_line + TEST_MIGRATIONS_ADD, 9),
        {
            "filePath": test_path,
            "oldString": last_line,
            "newString": last_line + TEST_MIGRATIONS_ADD,
            "replaceAll": False,
            "userModified": False,
            "structuredPatch": [],
        },
    )
    (bash2,) = s.respond(
        SONNET,
        tool(
            "Bash",
            command="python -m pytest tests/test_migrations.py -q -m db",
            description="Run the migration tests",
        ),
    )
    out = (
        "..                                                                       [100%]\n"
        "2 passed in 3.12s"
    )
    s.result(bash2, out, {"stdout": out, "stderr": "", "interrupted": False, "isImage": False})
    s.respond(
        SONNET,
        text(
            "Added `test_0009_backfill_keeps_half_cents`: it inserts `2.675` at revision 0008, "
            "upgrades to 0009 and asserts the stored amount is `2.68`. Both migration tests "
            "pass."
        ),
    )
    s.turn_done()
    return s


# ======================================================================================
# bob: web-dashboard, Opus, 1h cache. B1 reviews a PR (/review, API error, MCP GitHub);
# B2 delegates to an Explore subagent (Agent tool, transcript under subagents/).
# ======================================================================================
BOB_CWD = "/home/bob/work/web-dashboard"
B1_ID = "c2d7a9f4-1e6b-4f38-a5c0-9b3e8d2f7a16"
B2_ID = "5a9e3c71-d048-4b2f-86e1-f0c4a7b2d938"
B2_AGENT = "ae41f7c2"

REVIEW_PROMPT = """You are an expert code reviewer. Follow these steps:

1. If no PR number is provided in the args, use Bash("gh pr list") to show open PRs
2. If a PR number is provided, use Bash("gh pr view <number>") to get PR details
3. Use Bash("gh pr diff <number>") to get the diff
4. Analyze the changes and provide a thorough code review that includes:
   - Overview of what the PR does
   - Analysis of code quality and style
   - Specific suggestions for improvements
   - Any potential issues or risks

Keep your review concise but thorough. Focus on:
- Code correctness
- Following project conventions
- Performance implications
- Test coverage
- Security considerations

Format your review with clear sections and bullet points.

PR number: PR 42"""

PR_VIEW = json.dumps(
    {
        "title": "Live-refresh chart panel",
        "body": "Charts now refresh every 30s while the dashboard tab is open.\n\nCloses #38",
        "author": {"login": "dmitri-k"},
        "additions": 64,
        "deletions": 9,
        "files": [
            {"path": "src/components/ChartPanel.tsx", "additions": 41, "deletions": 9},
            {"path": "src/hooks/useMetrics.ts", "additions": 23, "deletions": 0},
        ],
    },
    indent=2,
)

PR_DIFF = """diff --git a/src/components/ChartPanel.tsx b/src/components/ChartPanel.tsx
@@ -18,9 +22,24 @@ export function ChartPanel({ metric, range }: ChartPanelProps) {
-  const { data, isLoading } = useMetrics(metric, range);
+  const [tick, setTick] = useState(0);
+  const { data, isLoading } = useMetrics(metric, range, tick);
+
+  useEffect(() => {
+    setInterval(() => setTick((t) => t + 1), REFRESH_MS);
+  }, [metric, range]);
+
diff --git a/src/hooks/useMetrics.ts b/src/hooks/useMetrics.ts
@@ -1,5 +1,28 @@
+export function useMetrics(metric: string, range: Range, tick = 0) {
+  const [data, setData] = useState<Point[] | null>(null);
+  useEffect(() => {
+    fetch(`/api/metrics/${metric}?range=${range}`)
+      .then((r) => r.json())
+      .then(setData);
+  }, [metric, range, tick]);"""

REVIEW_TEXT = """## Review: PR #42 — Live-refresh chart panel

**Overview.** Adds a 30 s refresh to `ChartPanel` by bumping a `tick` that `useMetrics` \
depends on.

### Issues
1. **Interval leak (must fix).** `ChartPanel.tsx:26` calls `setInterval` in an effect but \
never clears it. Every change of `metric`/`range` starts another interval, and unmounting \
leaves them running and calling `setTick` on an unmounted component. Return a cleanup:
   ```tsx
   useEffect(() => {
     const id = setInterval(() => setTick((t) => t + 1), REFRESH_MS);
     return () => clearInterval(id);
   }, [metric, range]);
   ```
2. **Race in `useMetrics`.** A slow response for an old `range` can overwrite a newer one. \
Use an `AbortController` (or an `ignore` flag) in the effect's cleanup, as the React docs \
recommend.
3. **No error handling.** A failed fetch leaves the previous data and no error state.

### Suggestions
- Pause refreshing while `document.hidden` is true.
- Add a test with fake timers asserting one interval per mounted panel.

**Verdict:** request changes (1 and 2)."""


def bob_b1() -> Transcript:
    s = Transcript(
        "bob",
        B1_ID,
        cwd=BOB_CWD,
        branch="main",
        version="2.1.19",
        start=at(10, 16, 45, 12),
        cache_ttl="1h",
    )
    s.prompt(
        "<command-message>review</command-message>\n<command-name>/review</command-name>\n"
        "<command-args>PR 42</command-args>",
        think=(0, 0),
    )
    s.user([text(REVIEW_PROMPT)], meta=True, delay=(0.0, 0.05))
    view_id, diff_id = s.respond(
        OPUS,
        text("I'll pull up PR 42 and its diff."),
        tool(
            "Bash",
            command="gh pr view 42 --json title,body,author,additions,deletions,files",
            description="Show PR 42 details",
        ),
        tool("Bash", command="gh pr diff 42", description="Show PR 42 diff"),
    )
    s.result(
        view_id, PR_VIEW, {"stdout": PR_VIEW, "stderr": "", "interrupted": False, "isImage": False}
    )
    s.result(
        diff_id, PR_DIFF, {"stdout": PR_DIFF, "stderr": "", "interrupted": False, "isImage": False}
    )
    s.api_error(
        'API Error: 529 {"type":"error","error":{"type":"overloaded_error",'
        '"message":"Overloaded"},"request_id":null}'
    )
    s.turn_done()
    s.prompt("continue", think=(10, 30))
    fetch_id, read_id = s.respond(
        OPUS,
        thinking(
            "The diff starts an interval in useEffect without cleanup, and useMetrics fetches "
            "without cancellation. I want the full ChartPanel to check whether cleanup exists "
            "elsewhere, and the React docs wording on fetching in effects to cite."
        ),
        tool(
            "WebFetch",
            url="https://react.dev/reference/react/useEffect",
            prompt="What does this page say about cleanup functions and about fetching data "
            "in effects (race conditions)?",
        ),
        tool("Read", file_path=f"{BOB_CWD}/src/components/ChartPanel.tsx", offset=15, limit=20),
    )
    fetched = (
        "The page says an Effect can return a cleanup function; React runs it before "
        "re-running the Effect with changed dependencies and after the component is "
        "removed. For data fetching it shows an `ignore` flag set in cleanup so that a "
        'stale response is not applied ("race conditions"), and suggests a framework '
        "or client-side cache instead of fetching in Effects directly."
    )
    s.result(
        fetch_id,
        fetched,
        {
            "bytes": 312_844,
            "code": 200,
            "codeText": "OK",
            "result": fetched,
            "durationMs": 2_417,
            "url": "https://react.dev/reference/react/useEffect",
        },
    )
    panel = (
        "  const [tick, setTick] = useState(0);\n"
        "  const { data, isLoading } = useMetrics(metric, range, tick);\n\n"
        "  useEffect(() => {\n"
        "    setInterval(() => setTick((t) => t + 1), REFRESH_MS);\n"
        "  }, [metric, range]);\n\n"
        "  if (isLoading) return <Spinner />;\n"
        "  return <LineChart data={data ?? []} height={240} />;\n}"
    )
    s.result(
        read_id,
        numbered(panel, 22),
        {
            "type": "text",
            "file": {
                "filePath": f"{BOB_CWD}/src/components/ChartPanel.tsx",
                "content": panel,
                "numLines": 10,
                "startLine": 22,
                "totalLines": 31,
            },
        },
    )
    s.respond(OPUS, text(REVIEW_TEXT), think=(15, 40))
    s.turn_done()
    # A prompt sent from the IDE extension: a list of text blocks, not a string.
    s.prompt(
        [
            text(
                "<ide_selection>The user selected the lines 25 to 27 from "
                f"{BOB_CWD}/src/components/ChartPanel.tsx:\n  useEffect(() => {{\n"
                "    setInterval(() => setTick((t) => t + 1), REFRESH_MS);\n  }}, [metric, range]);"
                "\n\nThis may or may not be related to the current task.</ide_selection>"
            ),
            text(
                "Good catch on the interval leak. Open an issue for it in acme/web-dashboard so it "
                "doesn't get lost, label it bug, and mention Dmitri."
            ),
        ]
    )
    (issue_id,) = s.respond(
        OPUS,
        tool(
            "mcp__github__create_issue",
            owner="acme",
            repo="web-dashboard",
            title="ChartPanel: refresh interval is never cleared",
            body="`ChartPanel` (added in #42) starts a `setInterval` in a `useEffect` without "
            "returning a cleanup, so every `metric`/`range` change adds an interval and "
            "unmounted panels keep calling `setTick`.\n\nFix: "
            "`return () => clearInterval(id);`\n\ncc @dmitri-k",
            labels=["bug"],
        ),
    )
    created = json.dumps(
        {
            "number": 57,
            "state": "open",
            "html_url": "https://github.com/acme/web-dashboard/issues/57",
            "title": "ChartPanel: refresh interval is never cleared",
        }
    )
    s.result(issue_id, [text(created)], [text(created)])
    s.respond(
        OPUS,
        text(
            "Opened acme/web-dashboard#57 (label `bug`, cc @dmitri-k): "
            "https://github.com/acme/web-dashboard/issues/57"
        ),
    )
    s.turn_done()
    return s


CSV_TS = """import { formatDate } from "../lib/dates";
import type { Row } from "../tables/types";

const COLUMNS = ["id", "name", "email", "plan", "created_at"] as const;

export function toCsv(rows: Row[]): string {
  const header = COLUMNS.join(",");
  const body = rows.map((r) =>
    COLUMNS.map((c) => (c === "created_at" ? formatDate(r[c]) : escape(String(r[c])))).join(","),
  );
  return [header, ...body].join("\\n");
}

function escape(v: string): string {
  return /[",\\n]/.test(v) ? `"${v.replace(/"/g, '""')}"` : v;
}"""

EXPLORE_PROMPT = (
    "Find where the dashboard tables are exported to CSV: the function that "
    "builds the CSV, the list of exported columns, and where a user's timezone "
    "is available (user settings/profile). Report file paths with line numbers. "
    "Do not modify anything."
)

EXPLORE_REPORT = """CSV export:
- `src/export/csv.ts:6` `toCsv(rows)` builds the CSV; columns come from the `COLUMNS` tuple at \
`src/export/csv.ts:4` (`id, name, email, plan, created_at`). `created_at` is formatted with \
`formatDate` (`src/lib/dates.ts:12`, always UTC).
- Called only from `src/tables/ExportButton.tsx:19`.

Timezone:
- `src/settings/useUserSettings.ts:8` returns `{ timezone, locale }`; `timezone` is an IANA \
name (e.g. `Europe/Berlin`). `Row` (`src/tables/types.ts:3`) has no timezone field."""


def bob_b2_subagent(parent: Transcript, tool_use_id: str) -> Transcript:
    a = Transcript(
        "bob",
        B2_ID,
        cwd=BOB_CWD,
        branch="feat/export-csv",
        version="2.1.19",
        start=parent.t,
        agent_id=B2_AGENT,
    )
    a.user(EXPLORE_PROMPT, parent=None, delay=(0.1, 0.4))
    grep_id, glob_id = a.respond(
        HAIKU,
        text("I'll search for the CSV builder and the timezone setting."),
        tool(
            "Grep",
            pattern="toCsv|text/csv",
            path=f"{BOB_CWD}/src",
            output_mode="files_with_matches",
        ),
        tool("Glob", pattern="src/**/*{Settings,settings}*.ts"),
    )
    a.result(
        grep_id,
        "Found 2 files\nsrc/export/csv.ts\nsrc/tables/ExportButton.tsx",
        {
            "mode": "files_with_matches",
            "filenames": ["src/export/csv.ts", "src/tables/ExportButton.tsx"],
            "numFiles": 2,
        },
    )
    a.result(
        glob_id,
        f"{BOB_CWD}/src/settings/useUserSettings.ts",
        {
            "filenames": [f"{BOB_CWD}/src/settings/useUserSettings.ts"],
            "durationMs": 9,
            "numFiles": 1,
            "truncated": False,
        },
    )
    read_id, grep2 = a.respond(
        HAIKU,
        tool("Read", file_path=f"{BOB_CWD}/src/export/csv.ts"),
        tool(
            "Grep", pattern="timezone", path=f"{BOB_CWD}/src", output_mode="content", **{"-n": True}
        ),
    )
    a.result(
        read_id,
        numbered(CSV_TS),
        {
            "type": "text",
            "file": {
                "filePath": f"{BOB_CWD}/src/export/csv.ts",
                "content": CSV_TS,
                "numLines": 16,
                "startLine": 1,
                "totalLines": 16,
            },
        },
    )
    tz = (
        'src/settings/useUserSettings.ts:8:  return { timezone: s.timezone ?? "UTC", '
        "locale: s.locale };\nsrc/lib/dates.ts:12:export const formatDate = (d: string) => "
        "new Date(d).toISOString(); // timezone: always UTC"
    )
    a.result(
        grep2, tz, {"mode": "content", "numFiles": 0, "filenames": [], "content": tz, "numLines": 2}
    )
    a.respond(HAIKU, text(EXPLORE_REPORT))
    return a


CSV_NEW_COLUMNS = (
    'const COLUMNS = ["id", "name", "email", "plan", "created_at", "timezone"] as const;'
)


def bob_b2() -> tuple[Transcript, Transcript, dict]:
    s = Transcript(
        "bob",
        B2_ID,
        cwd=BOB_CWD,
        branch="feat/export-csv",
        version="2.1.19",
        start=at(12, 10, 3, 55),
        cache_ttl="1h",
    )
    s.prompt(
        "Where do we build the CSV export for the dashboard tables? I want to add a column "
        "with the user's timezone.",
        think=(0, 0),
    )
    (agent_id,) = s.respond(
        OPUS,
        thinking(
            "This needs a search across the codebase for the CSV export and the user "
            "settings; an Explore agent keeps that out of my context."
        ),
        text("I'll have an Explore agent map the CSV export and where the timezone lives."),
        tool(
            "Agent",
            description="Find CSV export and timezone setting",
            prompt=EXPLORE_PROMPT,
            subagent_type="Explore",
        ),
    )
    sub = bob_b2_subagent(s, agent_id)
    s.t = sub.t
    meta = {
        "agentType": "Explore",
        "description": "Find CSV export and timezone setting",
        "toolUseId": agent_id,
    }
    last_usage = sub.lines[-1]["message"]["usage"]  # Claude Code reports the last call's
    total = sum(v for k, v in last_usage.items() if k.endswith("tokens"))
    s.result(
        agent_id,
        [text(EXPLORE_REPORT)],
        {
            "status": "completed",
            "prompt": EXPLORE_PROMPT,
            "agentId": B2_AGENT,
            "content": [text(EXPLORE_REPORT)],
            "totalDurationMs": 18_342,
            "totalTokens": total,
            "totalToolUseCount": 4,
            "usage": last_usage,
        },
    )
    # First Edit attempt uses a stale guess of the line: the tool rejects it.
    guess = 'const COLUMNS = ["id", "name", "email", "created_at"] as const;'
    (edit1,) = s.respond(
        OPUS,
        text("The columns are a tuple in `src/export/csv.ts`. I'll add `timezone` there."),
        tool(
            "Edit",
            file_path=f"{BOB_CWD}/src/export/csv.ts",
            old_string=guess,
            new_string=guess.replace('"created_at"', '"created_at", "timezone"'),
        ),
    )
    err = f"String to replace not found in file.\nString: {guess}"
    s.result(edit1, f"<tool_use_error>{err}</tool_use_error>", f"Error: {err}", is_error=True)
    (read_id,) = s.respond(
        OPUS, tool("Read", file_path=f"{BOB_CWD}/src/export/csv.ts", offset=1, limit=6)
    )
    head = "\n".join(CSV_TS.split("\n")[:6])
    s.result(
        read_id,
        numbered(head),
        {
            "type": "text",
            "file": {
                "filePath": f"{BOB_CWD}/src/export/csv.ts",
                "content": head,
                "numLines": 6,
                "startLine": 1,
                "totalLines": 16,
            },
        },
    )
    old = 'const COLUMNS = ["id", "name", "email", "plan", "created_at"] as const;'
    (edit2,) = s.respond(
        OPUS,
        tool(
            "Edit",
            file_path=f"{BOB_CWD}/src/export/csv.ts",
            old_string=old,
            new_string=CSV_NEW_COLUMNS,
        ),
    )
    s.result(
        edit2,
        f"The file {BOB_CWD}/src/export/csv.ts has been updated. Here's the result "
        "of running `cat -n` on a snippet of the edited file:\n" + numbered(CSV_NEW_COLUMNS, 4),
        {
            "filePath": f"{BOB_CWD}/src/export/csv.ts",
            "oldString": old,
            "newString": CSV_NEW_COLUMNS,
            "replaceAll": False,
            "userModified": False,
            "structuredPatch": [
                {
                    "oldStart": 4,
                    "oldLines": 1,
                    "newStart": 4,
                    "newLines": 1,
                    "lines": ["-" + old, "+" + CSV_NEW_COLUMNS],
                }
            ],
        },
    )
    (bash_id,) = s.respond(
        OPUS,
        text(
            "`Row` has no `timezone`, so `ExportButton` must fill it from "
            "`useUserSettings()`. Let me run the export tests first to see what breaks."
        ),
        tool("Bash", command="npm test -- --run src/export", description="Run export tests"),
    )
    out = (
        " ✓ src/export/csv.test.ts (3 tests) 12ms\n\n Test Files  1 passed (1)\n      "
        "Tests  3 passed (3)\n   Duration  1.21s"
    )
    s.result(bash_id, out, {"stdout": out, "stderr": "", "interrupted": False, "isImage": False})
    s.respond(
        OPUS,
        text(
            "`timezone` is now the last CSV column (`src/export/csv.ts:4`) and the export "
            "tests pass. The values come from `useUserSettings().timezone` "
            "(`src/settings/useUserSettings.ts:8`, defaults to `UTC`); `ExportButton.tsx:19` "
            "still needs to add it to each row before calling `toCsv`. Note `created_at` is "
            "always formatted in UTC by `formatDate`."
        ),
    )
    s.turn_done()
    s.prompt("Also add a line to CHANGELOG.md under Unreleased.")
    old_cl = "## Unreleased\n"
    new_cl = "## Unreleased\n\n- CSV export: new `timezone` column with the user's timezone.\n"
    (cl_id,) = s.respond(
        OPUS,
        tool("Edit", file_path=f"{BOB_CWD}/CHANGELOG.md", old_string=old_cl, new_string=new_cl),
    )
    s.result(
        cl_id,
        f"The file {BOB_CWD}/CHANGELOG.md has been updated.",
        {
            "filePath": f"{BOB_CWD}/CHANGELOG.md",
            "oldString": old_cl,
            "newString": new_cl,
            "replaceAll": False,
            "userModified": False,
            "structuredPatch": [],
        },
    )
    s.respond(OPUS, text("Added under `## Unreleased`."))
    s.turn_done()
    return s, sub, meta


# ======================================================================================
# carol: data-platform, older client (2.0.76, `Task`), Sonnet then Haiku via /model.
# C1 brainstorms (plugin skill, Linear MCP, Task) and writes a SQL migration; it holds the one
# malformed line. C2 reads a PDF with the `pdf` skill, then switches model with /model.
# ======================================================================================
CAROL_CWD = "/home/carol/projects/data-platform"
C1_ID = "e4b1f8a2-9c3d-4e57-b6a0-2d8f1c7e5b39"
C2_ID = "7d2c5e90-3a1f-4b86-9d4e-c8f0b6a1e257"

BRAINSTORM_SKILL = """Base directory for this skill: \
/home/carol/.claude/plugins/cache/superpowers/skills/brainstorming

# Brainstorming Ideas Into Designs

Help turn ideas into fully formed designs through natural collaborative dialogue.

1. Understand the current project context first (files, docs, open issues).
2. Ask questions one at a time to refine the idea.
3. Propose 2-3 approaches with trade-offs and a recommendation.
4. Present the design in small sections and check each with the user."""

LINEAR_ISSUES = json.dumps(
    [
        {
            "identifier": "DATA-212",
            "title": "Partition orders by month",
            "state": "Todo",
            "assignee": "carol",
            "priority": 2,
        },
        {
            "identifier": "DATA-198",
            "title": "Last-30-days orders dashboard times out",
            "state": "In Progress",
            "assignee": "sam",
            "priority": 1,
        },
        {
            "identifier": "DATA-174",
            "title": "Archive orders older than 7 years",
            "state": "Backlog",
            "assignee": None,
            "priority": 3,
        },
    ]
)

TASK_PROMPT = (
    "Search this repository for every query against the `orders` table: SQL files "
    "under db/ and dbt/, and Python under services/. For each, give file:line and "
    "whether it filters on `created_at` (and how). Also list foreign keys that "
    "reference orders. Read-only: do not edit files."
)
TASK_REPORT = """Found 9 queries against `orders`:
- 7 filter on `created_at` with a range (dbt/models/marts/orders_daily.sql:14, \
services/reporting/queries.py:41, :88, db/views/v_recent_orders.sql:6, ...).
- 2 look up by primary key only (services/api/orders.py:52, :77).
Foreign keys referencing orders: `order_items.order_id`, `refund_requests.order_id`.
Primary key is `id` alone, so a partitioned table needs `(id, created_at)`."""

PARTITION_SQL = """-- DATA-212: partition orders by month on created_at.
BEGIN;

ALTER TABLE orders RENAME TO orders_unpartitioned;

CREATE TABLE orders (LIKE orders_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (created_at);
ALTER TABLE orders ADD PRIMARY KEY (id, created_at);

DO $$
DECLARE m date;
BEGIN
    FOR m IN SELECT generate_series('2019-01-01'::date, '2027-12-01'::date, interval '1 month')
    LOOP
        EXECUTE format(
            'CREATE TABLE orders_%s PARTITION OF orders FOR VALUES FROM (%L) TO (%L)',
            to_char(m, 'YYYY_MM'), m, m + interval '1 month');
    END LOOP;
END $$;

INSERT INTO orders SELECT * FROM orders_unpartitioned;

ALTER TABLE order_items DROP CONSTRAINT order_items_order_id_fkey;
ALTER TABLE refund_requests DROP CONSTRAINT refund_requests_order_id_fkey;

COMMIT;"""


def carol_c1() -> Transcript:
    s = Transcript(
        "carol",
        C1_ID,
        cwd=CAROL_CWD,
        branch="feat/orders-partitioning",
        version="2.0.76",
        start=at(17, 13, 21, 40),
    )
    s.prompt(
        "I need to partition the orders table by month. Let's brainstorm the approach "
        "before writing anything.",
        think=(0, 0),
    )
    (skill_id,) = s.respond(
        SONNET,
        text("I'm using the brainstorming skill to work through the design with you."),
        tool("Skill", skill="superpowers:brainstorming"),
    )
    s.result(
        skill_id,
        "Launching skill: superpowers:brainstorming",
        {"success": True, "commandName": "superpowers:brainstorming"},
    )
    s.user([text(BRAINSTORM_SKILL)], meta=True, delay=(0.0, 0.05))
    (linear_id,) = s.respond(
        SONNET,
        tool("mcp__plugin_linear_linear__list_issues", query="orders", team="DATA", limit=10),
    )
    s.result(linear_id, [text(LINEAR_ISSUES)], [text(LINEAR_ISSUES)])
    (task_id,) = s.respond(
        SONNET,
        thinking(
            "DATA-212 is the ticket; DATA-198 is the motivating slow query. Before "
            "proposing designs I need to know how orders is queried and what references "
            "it, because a partitioned table needs the partition key in the primary key "
            "and FKs to it become a problem."
        ),
        text(
            "DATA-212 is the ticket and DATA-198 the slow dashboard behind it. I'll have an "
            "agent survey how `orders` is queried before proposing anything."
        ),
        tool(
            "Task",
            description="Survey queries on orders",
            prompt=TASK_PROMPT,
            subagent_type="general-purpose",
        ),
    )
    s.advance(30, 50)
    s.result(
        task_id,
        [text(TASK_REPORT)],
        {
            "status": "completed",
            "prompt": TASK_PROMPT,
            "agentId": "5b2e9d1f",
            "content": [text(TASK_REPORT)],
            "totalDurationMs": 41_208,
            "totalTokens": 31_877,
            "totalToolUseCount": 11,
            "usage": {
                "input_tokens": 6,
                "cache_creation_input_tokens": 1_204,
                "cache_read_input_tokens": 29_911,
                "output_tokens": 756,
                "service_tier": "standard",
            },
        },
    )
    s.respond(
        SONNET,
        text(
            "Three ways to do it:\n\n**A. pg_partman** — manages future partitions for you, "
            "but it's a new extension on the RDS instance.\n**B. Native range partitions + a "
            "monthly job** (recommended) — create `orders` as `PARTITION BY RANGE "
            "(created_at)`, pre-create partitions through 2027, add a cron to create the "
            "next ones. The PK becomes `(id, created_at)` and the two FKs into `orders` "
            "(`order_items`, `refund_requests`) must be dropped or turned into triggers.\n"
            "**C. Keep one table, add a BRIN index on `created_at`** — fixes DATA-198 cheaply "
            "but doesn't help DATA-174 archiving.\n\nWhich way do you want to go?"
        ),
        think=(10, 25),
    )
    s.turn_done()
    s.prompt("B. Go ahead and write the migration, we'll handle the FKs with triggers later.")
    # The text line of the next (streamed) response is the one written truncated.
    first = len(s.lines)
    (glob_id,) = s.respond(
        SONNET,
        text("I'll follow the existing migration naming; let me look at the folder."),
        tool("Glob", pattern="db/migrations/*.sql"),
    )
    truncated = json.dumps(s.lines[first], ensure_ascii=False, separators=(",", ":"))
    s.lines[first] = truncated[: len(truncated) * 3 // 5]
    names = [
        "db/migrations/20260902_orders_add_channel.sql",
        "db/migrations/20261020_customers_email_idx.sql",
    ]
    s.result(
        glob_id,
        "\n".join(f"{CAROL_CWD}/{n}" for n in names),
        {
            "filenames": [f"{CAROL_CWD}/{n}" for n in names],
            "durationMs": 11,
            "numFiles": 2,
            "truncated": False,
        },
    )
    last_mig = f"{CAROL_CWD}/db/migrations/20261020_customers_email_idx.sql"
    (read_id,) = s.respond(SONNET, tool("Read", file_path=last_mig))
    idx_sql = (
        "-- DATA-190\nCREATE INDEX CONCURRENTLY IF NOT EXISTS customers_email_idx\n"
        "    ON customers (lower(email));"
    )
    s.result(
        read_id,
        numbered(idx_sql),
        {
            "type": "text",
            "file": {
                "filePath": f"{CAROL_CWD}/db/migrations/20261020_customers_email_idx.sql",
                "content": idx_sql,
                "numLines": 3,
                "startLine": 1,
                "totalLines": 3,
            },
        },
    )
    mig = f"{CAROL_CWD}/db/migrations/20261117_orders_partition_by_month.sql"
    (write_id,) = s.respond(SONNET, tool("Write", file_path=mig, content=PARTITION_SQL))
    s.result(
        write_id,
        f"File created successfully at: {mig}",
        {"type": "create", "filePath": mig, "content": PARTITION_SQL, "structuredPatch": []},
    )
    (bash_id,) = s.respond(
        SONNET,
        tool(
            "Bash",
            command="make db-test MIGRATION=20261117_orders_partition_by_month",
            description="Apply the migration to the test database",
        ),
    )
    out = (
        "docker compose run --rm migrate apply 20261117_orders_partition_by_month\n"
        "applied 20261117_orders_partition_by_month.sql (108 partitions, 1,204,331 rows "
        "copied) in 14.2s\nrow count check: orders=1204331 orders_unpartitioned=1204331 OK"
    )
    s.result(bash_id, out, {"stdout": out, "stderr": "", "interrupted": False, "isImage": False})
    s.respond(
        SONNET,
        text(
            "Wrote `db/migrations/20261117_orders_partition_by_month.sql`: renames the old "
            "table, creates `orders` partitioned by month on `created_at` with PK "
            "`(id, created_at)`, pre-creates 108 partitions (2019-01 → 2027-12), copies the "
            "rows and drops the two FKs (to be replaced by triggers). On the test DB it copied "
            "all 1,204,331 rows. `orders_unpartitioned` is kept for now so you can drop it "
            "after verifying."
        ),
    )
    s.turn_done()
    return s


PDF_SKILL = """Base directory for this skill: /home/carol/.claude/skills/pdf

# PDF Processing Guide

Extract text with `pdftotext -layout file.pdf -` (poppler-utils). For tables use pdfplumber;
for scanned PDFs OCR with pytesseract. Always cite page numbers in summaries."""

PDF_TEXT = """             Northwind Analytics — Data Retention Addendum (v3)             page 1
3.1 Customer personal data (name, e-mail, IP address) must be deleted or irreversibly
    anonymised within 30 days after contract termination.
3.2 Event-level logs: retained at most 13 months from collection.
3.3 Aggregates without personal data may be kept indefinitely.
                                                                                page 2
4.1 Backups containing personal data must expire within 90 days.
4.2 On request, the processor confirms deletion in writing within 10 business days."""

PDF_SUMMARY = """**Must delete (Northwind retention addendum v3):**
- **Customer personal data** (name, e-mail, IP): within **30 days** after contract end (§3.1, p.1)
- **Event-level logs**: at most **13 months** after collection (§3.2, p.1)
- **Backups** with personal data: expire within **90 days** (§4.1, p.2)

**May keep:** aggregates without personal data, indefinitely (§3.3).
**Also:** confirm deletion in writing within 10 business days when asked (§4.2)."""

CHECKLIST = """# Northwind data retention checklist

- [ ] Delete/anonymise customer personal data ≤ 30 days after contract end (§3.1)
- [ ] Drop event-level logs older than 13 months (§3.2)
- [ ] Backup retention with personal data ≤ 90 days (§4.1)
- [ ] Written deletion confirmation within 10 business days on request (§4.2)
"""


def carol_c2() -> Transcript:
    s = Transcript(
        "carol",
        C2_ID,
        cwd=CAROL_CWD,
        branch="main",
        version="2.0.76",
        start=at(24, 8, 50, 3),
    )
    pdf = "docs/vendor/retention-spec.pdf"
    s.prompt(
        f"Summarize the vendor's retention spec in {pdf}: what do we have to delete, and by when?",
        think=(0, 0),
    )
    (skill_id,) = s.respond(SONNET, tool("Skill", skill="pdf"))
    s.result(skill_id, "Launching skill: pdf", {"success": True, "commandName": "pdf"})
    s.user([text(PDF_SKILL)], meta=True, delay=(0.0, 0.05))
    (bash_id,) = s.respond(
        SONNET,
        tool(
            "Bash",
            command=f"pdftotext -layout {pdf} - | head -80",
            description="Extract the PDF text",
        ),
    )
    s.result(
        bash_id,
        PDF_TEXT,
        {"stdout": PDF_TEXT, "stderr": "", "interrupted": False, "isImage": False},
    )
    s.respond(SONNET, text(PDF_SUMMARY))
    s.turn_done()
    # A typed local command: the command line, then its output (neither is a prompt).
    s.advance(20, 40)
    s.user(
        "<command-name>/model</command-name>\n            <command-message>model"
        "</command-message>\n            <command-args>haiku</command-args>"
    )
    s.user(
        "<local-command-stdout>Set model to \u001b[1mhaiku (claude-haiku-4-5-20251001)"
        "\u001b[22m</local-command-stdout>",
        delay=(0.0, 0.1),
    )
    s.prompt("Turn that into a checklist in docs/retention-checklist.md")
    path = f"{CAROL_CWD}/docs/retention-checklist.md"
    (write_id,) = s.respond(HAIKU, tool("Write", file_path=path, content=CHECKLIST))
    s.result(
        write_id,
        f"File created successfully at: {path}",
        {"type": "create", "filePath": path, "content": CHECKLIST, "structuredPatch": []},
    )
    s.respond(HAIKU, text("Created `docs/retention-checklist.md` with the four obligations."))
    s.turn_done()
    s.prompt("Does 3.2 apply to our clickstream table? It's keyed by anonymous device ids.")
    s.respond(
        HAIKU,
        thinking(
            "Device ids tied to a person are usually personal data under GDPR; the "
            "clause is about event-level logs regardless of personal data."
        ),
        text(
            "Yes. §3.2 covers *event-level logs* whatever their keys, so clickstream rows "
            "older than 13 months have to go even if the ids are anonymous. (Separately, "
            "persistent device ids are usually personal data under GDPR, which would also "
            "bring them under §3.1.)"
        ),
    )
    s.turn_done()
    return s


def generate() -> None:
    for user in USERS:
        shutil.rmtree(OUT / user, ignore_errors=True)
    a1 = alice_a1()
    a2 = alice_a2(a1)
    b1 = bob_b1()
    b2, b2_sub, b2_meta = bob_b2()
    c1 = carol_c1()
    c2 = carol_c2()
    for s in (a1, a2, b1, b2, b2_sub, c1, c2):
        s.write()
    meta_path = b2_sub.path.with_name(f"agent-{B2_AGENT}.meta.json")
    meta_path.write_text(json.dumps(b2_meta, indent=2) + "\n", encoding="utf-8")


# ======================================================================================
# Check: re-read the files and compute the facts a test can assert.
# ======================================================================================
def facts(path: Path) -> dict:
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), f"{path} does not end with a newline"
    lines = raw.decode("utf-8").split("\n")[:-1]
    f = {"lines": len(lines), "malformed": 0, "types": defaultdict(int)}
    final: dict[tuple, dict] = {}
    first: dict[tuple, dict] = {}
    naive_out = 0
    line_count: dict[tuple, int] = defaultdict(int)
    tools: dict[str, str] = {}
    errors: set[str] = set()
    slash = 0
    for line in lines:
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            f["malformed"] += 1
            continue
        t = d.get("type")
        f["types"][t if t != "system" else f"system:{d['subtype']}"] += 1
        if t not in ("user", "assistant"):
            continue
        for k in (
            "parentUuid",
            "isSidechain",
            "userType",
            "cwd",
            "sessionId",
            "version",
            "gitBranch",
            "message",
            "uuid",
            "timestamp",
        ):
            assert k in d, (path, k)
        assert d["timestamp"].endswith("Z") and d["timestamp"].startswith("2026-11-")
        content = d["message"]["content"]
        if t == "assistant":
            m = d["message"]
            if m["model"] == "<synthetic>":
                assert d.get("isApiErrorMessage") is True
                continue
            key = (m["id"], d["requestId"])
            line_count[key] += 1
            first.setdefault(key, d)
            naive_out += m["usage"]["output_tokens"]
            final[key] = d
        if t == "user" and not d.get("isMeta"):
            texts = (
                [content]
                if isinstance(content, str)
                else [b.get("text", "") for b in content if b.get("type") == "text"]
            )
            slash += any("<command-name>" in x for x in texts)
        if isinstance(content, list):
            for b in content:
                if b.get("type") == "tool_use":
                    tools[b["id"]] = b["name"]
                elif b.get("type") == "tool_result" and b.get("is_error"):
                    errors.add(b["tool_use_id"])
    for key, d in final.items():
        assert d["message"]["stop_reason"] is not None, (path, key)
    cats = defaultdict(int)
    for name in tools.values():
        if name == "Skill":
            cats["skill"] += 1
        elif name in ("Task", "Agent"):
            cats["agent"] += 1
        elif name.startswith("mcp__"):
            cats["mcp"] += 1
        else:
            cats["other"] += 1
    f.update(
        requests=len(final),
        streamed=sum(n > 1 for n in line_count.values()),
        tool_uses=len(tools),
        tool_ids=set(tools),
        errors=len(errors),
        slash=slash,
        output_tokens=sum(d["message"]["usage"]["output_tokens"] for d in final.values()),
        final_usage={k: d["message"]["usage"] for k, d in final.items()},
        cats=cats,
        assistant_lines=sum(line_count.values()),
        naive_out=naive_out,
        first_out=sum(d["message"]["usage"]["output_tokens"] for d in first.values()),
    )
    models: dict[str, int] = defaultdict(int)
    for d in final.values():
        models[d["message"]["model"]] += 1
    f["models"] = dict(sorted(models.items()))
    for field in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        f[field] = sum(d["message"]["usage"][field] for d in final.values())
    return f


def check() -> None:
    files = sorted(OUT.rglob("*.jsonl"))
    rows = {p.relative_to(OUT).as_posix(): facts(p) for p in files}
    assert sum(r["malformed"] for r in rows.values()) == 1, "want exactly one malformed line"
    for meta in OUT.rglob("agent-*.meta.json"):
        m = json.loads(meta.read_text())
        parent = OUT / meta.parts[-4] / f"{meta.parts[-3]}.jsonl"
        assert m["toolUseId"] in rows[parent.relative_to(OUT).as_posix()]["tool_ids"], meta
    hdr = (
        "| file | lines | malformed | requests | streamed | tool_use ids | Skill | Task/Agent "
        "| mcp__ | other | tool errors | slash cmds | output_tokens |"
    )
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for name, r in rows.items():
        c = r["cats"]
        print(
            f"| {name} | {r['lines']} | {r['malformed']} | {r['requests']} | {r['streamed']} | "
            f"{r['tool_uses']} | {c['skill']} | {c['agent']} | {c['mcp']} | {c['other']} | "
            f"{r['errors']} | {r['slash']} | {r['output_tokens']} |"
        )
    hdr = (
        "| file | assistant lines | output (sum of all lines) | output (first line) | "
        "input | cache_creation | cache_read | requests per model |"
    )
    print("\n" + hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for name, r in rows.items():
        models = ", ".join(f"{m.removeprefix('claude-')}: {n}" for m, n in r["models"].items())
        print(
            f"| {name} | {r['assistant_lines']} | {r['naive_out']} | {r['first_out']} | "
            f"{r['input_tokens']} | {r['cache_creation_input_tokens']} | "
            f"{r['cache_read_input_tokens']} | {models} |"
        )
    all_final: dict = {}
    for r in rows.values():
        all_final.update(r["final_usage"])
    total_lines = sum(r["requests"] for r in rows.values())
    print(
        f"\nrequests summed per file: {total_lines}; distinct across files: {len(all_final)}; "
        f"output_tokens deduped across files: "
        f"{sum(u['output_tokens'] for u in all_final.values())}"
    )
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total size of {OUT.name}/: {size} bytes")


if __name__ == "__main__":
    if "--check" not in sys.argv[1:]:
        generate()
    check()
