"""Health thresholds as plain functions: grace = 2 x cadence, stuck past 4 x grace."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.health import assess
from processors.registry import Entry
from processors.usage import UsageProcessor
from state.plan import StoredState
from state.scan import FoundFile

NOW = 1_800_000_000.0
USAGE = Entry("usage", UsageProcessor(), None)  # cadence 600: grace 1200, stuck past 4800


def _file(key: str, age: float) -> FoundFile:
    return FoundFile(key, f"/d/{key}", 10, int((NOW - age) * 1e9))


def _ok(f: FoundFile) -> StoredState:
    return StoredState(f.size, f.mtime_ns, "h", UsageProcessor.version, "ok", 0, None)


@pytest.mark.parametrize(
    ("ages", "processed", "status"),
    [
        ([], [], "ok"),
        ([5000.0], [True], "ok"),  # everything processed, however old
        ([100.0], [False], "ok"),  # waiting, but within the grace window
        ([1300.0, 5.0], [True, False], "ok"),
        ([1300.0], [False], "warning"),  # waited past 2 x cadence
        ([4900.0], [False], "stuck"),  # never processed, older than 4 x grace
    ],
)
@pytest.mark.parametrize("as_settled", [False, True], ids=["state-rows", "settled-set"])
def test_thresholds(
    ages: list[float], processed: list[bool], status: str, as_settled: bool
) -> None:
    """The same verdicts whether a processed file comes as its whole state row or only as
    `(key, size, mtime_ns)` in the settled set (what `health()` loads at scale)."""
    found = [_file(f"alice/s{i}.jsonl", age) for i, age in enumerate(ages)]
    done = [f for f, ok in zip(found, processed, strict=True) if ok]
    states = {} if as_settled else {f.key: _ok(f) for f in done}
    settled = {(f.key, f.size, f.mtime_ns) for f in done} if as_settled else set()
    report = assess(USAGE, found, states, (datetime.now(UTC), 0), NOW, settled)
    assert report.status == status, report.message
    assert report.pending == processed.count(False)


def test_env_cadence_and_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    found = [_file("alice/a.jsonl", 130.0)]
    monkeypatch.setenv("SCHEDULER_USAGE_PROCESSOR_INTERVAL", "60")
    assert assess(USAGE, found, {}, (None, None), NOW).status == "warning"
    monkeypatch.setenv("SCHEDULER_USAGE_PROCESSOR_INTERVAL", "")
    report = assess(USAGE, found, {}, (None, None), NOW)
    assert report.status == "disabled" and "must be a positive integer" in report.message
    off = assess(
        Entry("verification", None, "ANTHROPIC_API_KEY is not set"), found, {}, (None, None), NOW
    )
    assert (off.status, off.message) == ("disabled", "ANTHROPIC_API_KEY is not set")


def test_a_failing_session_counts_as_lag_and_a_quarantined_one_does_not() -> None:
    failing, held = _file("alice/f.jsonl", 2000.0), _file("alice/q.jsonl", 9000.0)
    states = {
        failing.key: StoredState(10, failing.mtime_ns, "h", "1", "failed", 2, None),
        held.key: StoredState(None, None, None, None, "quarantined", 5, None),  # type: ignore[arg-type]
    }
    report = assess(USAGE, [failing, held], states, (None, None), NOW)
    assert (report.status, report.pending, report.failed, report.quarantined) == (
        "warning",
        1,
        1,
        1,
    )


def test_health_of_a_real_state_database(data_dir: Path, db: Path) -> None:
    from flows.health import health
    from flows.pipeline import run_direct
    from processors.registry import Entry
    from state.db import connect
    from tests.conftest import user_line, write_session

    for i in range(3):
        write_session(data_dir, f"alice/s{i}.jsonl", [user_line(f"hello {i}")])
    run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    entries = [Entry("usage", UsageProcessor(), None)]
    (usage,) = health(entries, data_dir, db)["processors"]
    assert (usage["status"], usage["pending"], usage["message"]) == ("ok", 0, "up to date")
    with (data_dir / "alice/s1.jsonl").open("ab") as f:
        f.write(b'{"type":"user","message":{"role":"user","content":"more"}}\n')
    (usage,) = health(entries, data_dir, db)["processors"]
    assert (usage["pending"], usage["message"]) == (1, "1 session(s) waiting")
    # failures are counted even when their file is gone, and for a disabled processor too
    with connect(db) as con:
        con.execute(
            "INSERT INTO session_processor_state (processor_name, session_file, status) "
            "VALUES ('usage', 'alice/gone.jsonl', 'failed'), ('usage', 'bob/x.jsonl', 'quarantined')"
        )
    (usage,) = health(entries, data_dir, db)["processors"]
    assert (usage["failed"], usage["quarantined"]) == (1, 1)
    off = [Entry("usage", UsageProcessor(), "switched off")]
    (usage,) = health(off, data_dir, db)["processors"]
    assert (usage["status"], usage["failed"], usage["quarantined"]) == ("disabled", 1, 1)
