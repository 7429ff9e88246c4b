"""Is each processor keeping up? Plain functions over a stat-only scan and the state DB.

The old thresholds: a processor is `warning` when a change has waited longer than 2 × its
cadence (the grace window), and `stuck` when a session has never been processed although it
is older than 4 × the grace window; `ok` otherwise, including when there are no files.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.cadence import cadence
from processors.registry import Entry
from state import store
from state.config import ConfigError
from state.db import Database, connect
from state.migrations import migrate
from state.plan import plan
from state.scan import FoundFile, scan

GRACE_CADENCES = 2
STUCK_GRACES = 4
SEVERITY = {"ok": 0, "disabled": 0, "warning": 1, "stuck": 2}


@dataclass
class ProcessorHealth:
    processor: str
    status: str  # ok | warning | stuck | disabled
    message: str
    cadence_seconds: int | None
    last_run_at: str | None
    last_run_errors: int | None
    pending: int  # sessions the next run would read (new, changed, retries)
    lag_seconds: float  # how long the oldest pending change has waited
    stuck_session: str | None
    stuck_age_seconds: float | None
    failed: int
    quarantined: int
    missing: int = 0  # sessions whose file is gone from the data dir (their rows are kept)


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def assess(
    entry: Entry,
    found: Sequence[FoundFile],
    states: dict[str, Any],
    last_run: tuple[datetime | None, int | None],
    now: float,
    settled: AbstractSet[tuple[str, int, int]] = frozenset(),
) -> ProcessorHealth:
    """One processor's health from what is on disk and what it has recorded. `states` must
    hold the rows of every file whose `(key, size, mtime_ns)` is not in `settled` (what
    this processor version last read well: such a file is up to date by definition)."""
    failed = sum(1 for s in states.values() if s.status == "failed")
    quarantined = sum(1 for s in states.values() if s.status == "quarantined")
    last_at = last_run[0].isoformat() if last_run[0] else None
    blank = ProcessorHealth(
        entry.name, "ok", "", None, last_at, last_run[1], 0, 0.0, None, None, failed, quarantined
    )
    if not entry.enabled or entry.processor is None:
        blank.status, blank.message = "disabled", entry.problem or "disabled"
        return blank
    try:
        gap = cadence(entry.processor).gap_seconds  # a cron schedule's longest wait
    except ConfigError as error:
        blank.status, blank.message = "disabled", str(error)
        return blank
    blank.cadence_seconds = gap
    grace = GRACE_CADENCES * gap
    if not found:
        blank.message = "no session files"
        return blank
    unsettled = [f for f in found if (f.key, f.size, f.mtime_ns) not in settled]
    the_plan = plan(unsettled, states, str(entry.processor.version))
    pending = the_plan.candidates
    blank.pending = len(pending)
    mtimes = {f.key: f.mtime_ns / 1e9 for f in found}
    if pending:
        blank.lag_seconds = round(max(0.0, now - min(mtimes[c.key] for c in pending)), 3)
    never = [
        f
        for f in unsettled
        if (s := states.get(f.key)) is None or (s.file_hash is None and s.status != "quarantined")
    ]
    if never:
        oldest = min(never, key=lambda f: f.mtime_ns)
        age = now - oldest.mtime_ns / 1e9
        if age > STUCK_GRACES * grace:
            blank.status = "stuck"
            blank.stuck_session, blank.stuck_age_seconds = oldest.key, round(age, 3)
            blank.message = (
                f"{oldest.key} has waited {age:.0f}s without being processed "
                f"(stuck past {STUCK_GRACES * grace}s)"
            )
            return blank
    if blank.lag_seconds > grace:
        blank.status = "warning"
        blank.message = (
            f"{len(pending)} session(s) waiting; the oldest change is {blank.lag_seconds:.0f}s old "
            f"(grace {grace}s = {GRACE_CADENCES} x cadence)"
        )
    else:
        blank.message = f"{len(pending)} session(s) waiting" if pending else "up to date"
    return blank


def health(entries: Sequence[Entry], data_dir: Path, db: Database) -> dict[str, Any]:
    """The whole report: overall status (the worst processor's) and one entry each."""
    now = time.time()
    found = scan(data_dir)
    settled: dict[str, set[tuple[str, int, int]]] = {}
    states: dict[str, dict[str, Any]] = {}
    with connect(db) as con:
        migrate(con)
        for e in entries:  # whole state rows only for unsettled files and failures
            failing = store.failing_sessions(con, e.name)
            if not e.enabled or e.processor is None:  # only its failures are reported
                settled[e.name] = set()
                states[e.name] = store.load_states(con, e.name, failing)
                continue
            settled[e.name], _ = store.load_settled(con, e.name, str(e.processor.version))
            unsettled = [f.key for f in found if (f.key, f.size, f.mtime_ns) not in settled[e.name]]
            states[e.name] = store.load_states(con, e.name, sorted({*unsettled, *failing}))
        missing = dict(
            con.execute(
                "SELECT processor_name, count(*) FROM session_processor_state "
                "WHERE status = 'missing' GROUP BY 1"
            ).fetchall()
        )
        runs = {
            row[0]: (row[1], row[2])
            for row in con.execute(
                "SELECT DISTINCT ON (processor_name) processor_name, finished_at, errors "
                "FROM processor_runs WHERE status = 'completed' AND finished_at IS NOT NULL "
                "ORDER BY processor_name, finished_at DESC"
            ).fetchall()
        }
    report = [
        assess(e, found, states[e.name], runs.get(e.name, (None, None)), now, settled[e.name])
        for e in entries
    ]
    for r in report:
        r.missing = missing.get(r.processor, 0)
    worst = max((r.status for r in report), key=SEVERITY.__getitem__, default="ok")
    return {
        "status": "ok" if worst == "disabled" else worst,
        "checked_at": _iso(now),
        "sessions": len(found),
        "newest_session_at": _iso(max((f.mtime_ns for f in found), default=0) / 1e9 or None),
        "processors": [asdict(r) for r in report],
    }
