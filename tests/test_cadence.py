"""Schedules: intervals, cron expressions and the old `daily HH:MM`, as Prefect receives them,
and the limits a run takes from the environment."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
from cronsim import CronSim
from prefect.client.schemas.schedules import RRuleSchedule

from flows.cadence import Cadence, cadence, cron_rrule, parse_schedule
from flows.deploy_steps import processor_settings
from flows.health import assess
from flows.pipeline import run_limits
from processors.registry import Entry
from processors.usage import UsageProcessor
from state.config import ConfigError

START = datetime(2026, 12, 3, 17, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    "expression",
    [
        "15 4 * * *",
        "*/10 * * * *",
        "0 9 1 * 1-5",  # day of month OR day of week, as cron means it
        "30 2 * * sun",
        "0 */6 * * *",
        "5,35 8-18/2 * jan,jul 1,3,5",
        "0 0 29 2 *",
        "* 3 * * 7",
    ],
)
def test_prefect_fires_a_cron_schedule_when_cron_does(expression: str) -> None:
    """The RRULE Prefect is given fires exactly when an independent cron implementation
    (cronsim, which Prefect ships) says, over the next 300 times."""
    schedule = RRuleSchedule(rrule=cron_rrule(expression), timezone="UTC").to_rrule()
    ours = [t.astimezone(UTC) for t in islice(schedule.xafter(START), 300)]
    theirs = list(islice(CronSim(expression, START), 300))
    assert ours == theirs


def test_the_old_daily_form_and_bad_schedules() -> None:
    assert parse_schedule("X", "daily 04:15") == "15 4 * * *"
    assert parse_schedule("X", "  15  4 * *   * ") == "15 4 * * *"
    for bad, why in [
        ("daily 24:00", "is not a time of day"),
        ("61 * * * *", "minute 61 out of 0-59"),
        ("* * *", "expected 5 fields"),
        ("*/0 * * * *", "bad step"),
        ("", "expected 5 fields"),
        ("@daily", "expected 5 fields"),
        ("x 4 * * *", "bad minute"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_schedule("SCHEDULER_VERIFICATION_SCHEDULE", bad)


def test_a_schedule_replaces_the_interval_and_sets_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    usage = UsageProcessor()
    assert cadence(usage) == Cadence(interval=600)
    monkeypatch.setenv("SESSION_PIPELINE_USAGE_SCHEDULE", "daily 04:15")
    assert cadence(usage) == Cadence(cron="15 4 * * *")
    assert cadence(usage).gap_seconds == 86_400
    settings = processor_settings("usage")
    assert settings["interval"] == 86_400
    assert "RRULE:FREQ=DAILY;BYSECOND=0;BYMINUTE=15;BYHOUR=4" in str(settings["rrule"])
    # health's grace window follows the real gap: a day-old change is within 2 x 1 day
    now = START.timestamp()
    found = [_found("alice/a.jsonl", now - 30 * 3600)]
    report = assess(Entry("usage", usage, None), found, {}, (None, None), now)
    assert (report.status, report.cadence_seconds) == ("ok", 86_400)
    monkeypatch.setenv("SESSION_PIPELINE_USAGE_SCHEDULE", "every day")
    with pytest.raises(ConfigError, match="SESSION_PIPELINE_USAGE_SCHEDULE must be a cron"):
        cadence(usage)


def test_verification_reads_the_old_schedule_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from processors.verification import VerificationProcessor

    monkeypatch.setenv("SCHEDULER_VERIFICATION_SCHEDULE", "daily 03:30")
    assert cadence(VerificationProcessor()).cron == "30 3 * * *"


def _found(key: str, mtime: float) -> Any:
    from state.scan import FoundFile

    return FoundFile(key, f"/d/{key}", 10, int(mtime * 1e9))


class Costly:
    name = "costly"
    cadence_seconds = 1000
    time_budget_share = 0.8


def test_run_limits_from_flag_environment_and_cadence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SESSION_PROCESSOR_MAX_PER_RUN", raising=False)
    before = datetime.now(UTC).timestamp()
    limits = run_limits(Costly())  # type: ignore[arg-type]
    assert limits.deadline is not None and 799 < limits.deadline - before < 802
    assert limits.allowance is not None and limits.allowance.left == 50
    monkeypatch.setenv("SESSION_PIPELINE_COSTLY_TIME_BUDGET", "30")
    limits = run_limits(Costly())  # type: ignore[arg-type]
    assert limits.deadline is not None and 29 < limits.deadline - before < 32
    assert run_limits(Costly(), 5).deadline < before + 7  # type: ignore[arg-type, operator]
    monkeypatch.setenv("SESSION_PIPELINE_COSTLY_TIME_BUDGET", "0")
    assert run_limits(Costly()).deadline is None  # type: ignore[arg-type]
    monkeypatch.setenv("SESSION_PIPELINE_COSTLY_TIME_BUDGET", "soon")
    with pytest.raises(ConfigError, match="SESSION_PIPELINE_COSTLY_TIME_BUDGET must be"):
        run_limits(Costly())  # type: ignore[arg-type]
    monkeypatch.delenv("SESSION_PIPELINE_COSTLY_TIME_BUDGET")
    for value, cap in (("", None), ("0", None), ("7", 7)):
        monkeypatch.setenv("SESSION_PROCESSOR_MAX_PER_RUN", value)
        allowance = run_limits(Costly()).allowance  # type: ignore[arg-type]
        assert (allowance.left if allowance else None) == cap
    monkeypatch.setenv("SESSION_PROCESSOR_MAX_PER_RUN", "-2")
    with pytest.raises(ConfigError, match="SESSION_PROCESSOR_MAX_PER_RUN must be"):
        run_limits(Costly())  # type: ignore[arg-type]
    # usage is local and cheap: no cap, no time budget
    monkeypatch.setenv("SESSION_PROCESSOR_MAX_PER_RUN", "1")
    assert run_limits(UsageProcessor()) == run_limits(UsageProcessor()).__class__(None, None)


def test_the_cap_counts_sessions_read_not_candidates(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path, db: Path
) -> None:
    """Touched-but-unchanged sessions do not use up the cap (the old system's bug starved new
    sessions behind them); the sessions left over are deferred and read first next run."""
    from flows.pipeline import run_direct
    from tests.conftest import user_line, write_session
    from tests.test_pipeline import Recorder

    for n in range(3):
        write_session(data_dir, f"alice/old{n}.jsonl", [user_line(f"old {n}")])
    assert run_direct(Recorder(), data_dir, db, max_attempts=3).processed == 3
    for n in range(3):  # touched: new mtimes, same bytes
        path = data_dir / f"alice/old{n}.jsonl"
        path.write_bytes(path.read_bytes())
    for n in range(5):
        write_session(data_dir, f"bob/new{n}.jsonl", [user_line(f"new {n}")])
    monkeypatch.setenv("SESSION_PROCESSOR_MAX_PER_RUN", "2")
    proc = Recorder()
    figures = run_direct(proc, data_dir, db, max_attempts=3)
    assert (figures.processed, figures.skipped, figures.deferred) == (2, 3, 3)
    assert proc.seen == ["bob/new0.jsonl", "bob/new1.jsonl"]
    figures = run_direct(proc, data_dir, db, max_attempts=3)
    assert (figures.processed, figures.deferred) == (2, 1)
    assert proc.seen[2:] == ["bob/new2.jsonl", "bob/new3.jsonl"]


@pytest.mark.parametrize("seconds", [7, 10, 90, 600, 900, 3600, 7200])
def test_an_interval_rrule_fires_on_the_anchored_grid_and_is_cheap_to_compute(
    seconds: int,
) -> None:
    """The RRULE starts at the last grid time before now (not the anchor), so the times are
    the anchored ones while Prefect's walk from DTSTART to the next run stays short: from the
    anchor, a 10 s cadence cost 18 s of CPU per scheduler pass by December 2026."""
    import time
    from datetime import timedelta

    from flows.cadence import ANCHOR, interval_rrule

    started = time.process_time()
    schedule = RRuleSchedule(rrule=interval_rrule(seconds), timezone="UTC").to_rrule()
    now = datetime.now(UTC)
    ours = [t.astimezone(UTC) for t in islice(schedule.xafter(now), 5)]
    assert time.process_time() - started < 1.0
    first = ANCHOR + timedelta(seconds=-(-(now - ANCHOR).total_seconds() // seconds) * seconds)
    assert ours == [first + timedelta(seconds=i * seconds) for i in range(5)]
