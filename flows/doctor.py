"""`doctor`: find and fix what a dead process leaves behind in Prefect.

Prefect OSS leaves a flow run `Running` forever when its process dies (a SIGKILL, a reboot,
an OOM kill): there is no zombie detection without Prefect Cloud's automations, and such a
run keeps its deployment's concurrency slot, so every later run of that deployment waits
forever. Our own run ledger (`processor_runs`: host and pid of the process doing each run) says
whether the process behind a run is still there.

A run holds its processor's global slot through a lease named on its flow run (label
`session-pipeline.slot-lease`). A dead run's slot is freed by releasing exactly that lease,
never by setting the limit's count: a count set to 0 while the dead lease still exists is
decremented again when that lease expires, taking the slot of whichever run holds it then, and
two runs of one processor overlap.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from flows.names import flow_name, limit_name
from flows.prefect_api import (
    LEASE_LABEL,
    TERMINAL_STATES,
    PrefectAPI,
    PrefectUnavailable,
    api_url,
)
from processors import registry
from state.db import Database, StateError, connect, is_shared, location

# Flow runs in these states have (or are about to have) a process doing them.
WATCHED_STATES = ("RUNNING", "PENDING", "CANCELLING")
# A run with no ledger row is given this long to write one before it counts as dead: a run
# writes its row seconds after it starts (after taking its slot and scanning).
NO_LEDGER_GRACE = timedelta(minutes=10)
# A live pid whose process started this much later than the run's ledger row is a reused
# pid, not the run's process. Generous, so that a wall-clock step never makes a live run dead.
PID_REUSE_TOLERANCE = timedelta(minutes=10)
# Ended runs whose lease is released again when their slot is taken by no live run: the runner
# marks a killed run Crashed, and its crash hook may have failed to release the lease.
RECENT_ENDED_RUNS = 20


@dataclass(frozen=True)
class LedgerRow:
    run_id: str
    processor: str
    flow_run_id: str | None
    status: str
    host: str | None
    pid: int | None
    started_at: datetime | None


@dataclass(frozen=True)
class RunFinding:
    """A flow run (or a ledger row) whose process is gone, or that cannot be checked here."""

    processor: str
    flow_run_id: str | None
    name: str
    state: str
    reason: str


@dataclass(frozen=True)
class SlotFinding:
    """A processor's slot taken while no run holding it is alive; `dead_holders` names the
    dead runs whose lease may still hold it (released by name when fixing)."""

    processor: str
    limit: str
    active_slots: int
    dead_holders: tuple[str, ...] = ()


@dataclass
class DoctorReport:
    """What doctor found and what it did. `clean` when nothing needed attention."""

    fix: bool
    zombies: list[RunFinding] = field(default_factory=list)
    unchecked: list[RunFinding] = field(default_factory=list)
    stale_ledger: list[RunFinding] = field(default_factory=list)
    leaked_slots: list[SlotFinding] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)  # flow run ids forced to Crashed
    ledger_closed: list[str] = field(default_factory=list)  # run ids set to 'crashed'
    leases_released: list[str] = field(default_factory=list)  # flow run names
    slots_freed: list[str] = field(default_factory=list)  # limit names free after releasing
    errors: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.zombies or self.unchecked or self.stale_ledger or self.leaked_slots or self.errors
        )

    def lines(self) -> list[str]:
        """One line per finding, saying what was done about it; empty when clean."""
        out = []
        for z in self.zombies:
            done = (
                "marked Crashed"
                if z.flow_run_id in self.crashed
                else ("not fixed (report only)" if not self.fix else "not fixed, see the error")
            )
            out.append(
                f"zombie run {z.name} ({z.processor}, {z.state.lower()}): {z.reason}; {done}"
            )
        for u in self.unchecked:
            out.append(f"run {u.name} ({u.processor}, {u.state.lower()}): {u.reason}")
        for s in self.stale_ledger:
            done = (
                "marked crashed in the ledger"
                if s.name in self.ledger_closed
                else ("not fixed (report only)" if not self.fix else "not fixed, see the error")
            )
            out.append(f"ledger run {s.name} ({s.processor}) says running but {s.reason}; {done}")
        for slot in self.leaked_slots:
            holders = (
                f"held by dead run {', '.join(slot.dead_holders)}"
                if slot.dead_holders
                else f"held by no live {slot.processor} run"
            )
            if not self.fix:
                done = "not released (report only)"
            elif slot.limit in self.slots_freed:
                done = "released its lease"
            else:
                done = (
                    "no lease of a dead run left to release: it frees itself when its lease "
                    "expires (60 s; 5 min for a run of an older version); if it stays taken "
                    "(a server restarted with the in-memory lease store), free it with "
                    f"`prefect gcl update {slot.limit} --active-slots 0` once no run is going"
                )
            out.append(
                f"leaked slot: {slot.limit} has {slot.active_slots} active slot(s) {holders}; "
                f"{done}"
            )
        out.extend(f"error: {e}" for e in self.errors)
        return out


# ledger ---------------------------------------------------------------------------------


def _read_ledger(db: Database, flow_run_ids: Iterable[str]) -> list[LedgerRow]:
    """Rows still 'running' plus those of the given flow runs; none if there is no ledger."""
    if not db.exists():
        return []
    with connect(db, read_only=True) as con:
        columns = {
            row[0]
            for row in con.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_catalog = current_database() AND table_schema = current_schema() "
                "AND table_name = 'processor_runs'"
            ).fetchall()
        }
        if not {"status", "host", "pid"} <= columns:
            return []  # not migrated yet: no run has written a ledger row
        rows = con.execute(
            "SELECT run_id, processor_name, flow_run_id, status, host, pid, started_at "
            "FROM processor_runs WHERE status = 'running' "
            "OR flow_run_id IN (SELECT UNNEST($1::VARCHAR[]))",
            [list(flow_run_ids)],
        ).fetchall()
    return [LedgerRow(*row) for row in rows]


def close_ledger_rows(db: Database, run_ids: list[str], status: str = "crashed") -> list[str]:
    """Mark rows `status`, only those still 'running' (a row its run completed meanwhile
    keeps its figures); returns the ids changed. No database, no change."""
    if not run_ids or not db.exists():
        return []
    now = datetime.now(UTC)
    with connect(db) as con:
        rows = con.execute(
            "UPDATE processor_runs SET status = $3, finished_at = $1, "
            "duration_seconds = extract(epoch FROM $1::TIMESTAMPTZ - started_at) "
            "WHERE status = 'running' AND run_id IN (SELECT UNNEST($2::VARCHAR[])) "
            "RETURNING run_id",
            [now, run_ids, str(status)],
        ).fetchall()
    return [r[0] for r in rows]


# processes ------------------------------------------------------------------------------


def _proc_start(pid: int) -> tuple[str, datetime] | None:
    """(state letter, start time) of a process from /proc; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    ticks = int(fields[19])  # field 22 of proc(5), counted from the state at field 3
    started = datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC)
    return fields[0], started


def process_alive(pid: int, started_at: datetime | None = None) -> bool:
    """Is the process that wrote a ledger row (at `started_at`) still running on this host?
    A zombie (exited, not reaped) is dead; a pid reused by a later process is dead."""
    if pid <= 0:  # os.kill(0, …) would address our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    found = _proc_start(pid)
    if found is None:
        return True
    state, proc_started = found
    if state in ("Z", "X"):
        return False
    return not (started_at is not None and proc_started > started_at + PID_REUSE_TOLERANCE)


# runs -----------------------------------------------------------------------------------


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _age(run: dict[str, Any], now: datetime) -> timedelta:
    state = run.get("state") or {}
    since = (
        _when(run.get("start_time")) or _when(state.get("timestamp")) or _when(run.get("created"))
    )
    return now - since if since else timedelta(0)


@dataclass(frozen=True)
class _Verdict:
    alive: bool | None  # None: cannot be checked from here
    reason: str
    ledger: LedgerRow | None


def _same_db(run: dict[str, Any], db: Database) -> bool:
    """A run given another state database keeps its ledger row there, not in ours."""
    other = (run.get("parameters") or {}).get("db")
    return other is None or location(other).resolve() == db.resolve()


def _judge(
    run: dict[str, Any], ledger: dict[str, LedgerRow], db: Database, host: str, now: datetime
) -> _Verdict:
    row = ledger.get(run["id"])
    if row is None:
        if not _same_db(run, db):
            return _Verdict(None, f"cannot check (its ledger is {run['parameters']['db']})", None)
        age = _age(run, now)
        if age > NO_LEDGER_GRACE:
            minutes = int(age.total_seconds() // 60)
            return _Verdict(
                False, f"no ledger row after {minutes} min: its process died before writing", None
            )
        return _Verdict(True, "starting (no ledger row yet)", None)
    if row.host != host and is_shared(db):
        return _by_lock(row, db)
    if row.host != host:
        return _Verdict(None, f"cannot check (runs on host {row.host})", row)
    if row.pid is None:
        return _Verdict(None, "cannot check (its ledger row has no pid)", row)
    if process_alive(row.pid, row.started_at):
        return _Verdict(True, f"process {row.pid} is alive", row)
    return _Verdict(False, f"process {row.pid} on {host} is gone", row)


def _by_lock(row: LedgerRow, db: Database) -> _Verdict:
    """Every host's run holds its processor's advisory lock in the shared database, named by
    host and pid: a run whose lock nobody (or another process) holds is gone."""
    from state.postgres_backend import app_name

    holder = db.lock_holder(row.processor)
    if holder == app_name(row.host, row.pid):
        return _Verdict(True, f"process {row.pid} on {row.host} holds its lock", row)
    held = f"{holder} holds it" if holder else "nobody holds it"
    return _Verdict(False, f"process {row.pid} on {row.host} lost its lock ({held})", row)


def stale_ledger(
    rows: Sequence[LedgerRow], watched: AbstractSet[str], db: Database, host: str
) -> list[RunFinding]:
    """Ledger rows left 'running' by a process that is gone, whose flow run is over (Crashed
    by `doctor` elsewhere or by an automation) or that had none (a command-line run): `status`
    and the webhook would otherwise count them as going forever. A process of this host is
    looked up here; one of another host, by its lock when the state is shared."""
    found = []
    for row in rows:
        if row.status != "running" or row.flow_run_id in watched or row.pid is None:
            continue
        if row.host == host:
            if process_alive(row.pid, row.started_at):
                continue
            reason = f"process {row.pid} on {host} is gone"
        elif is_shared(db):
            verdict = _by_lock(row, db)
            if verdict.alive:
                continue
            reason = verdict.reason
        else:
            continue
        found.append(RunFinding(row.processor, row.flow_run_id, row.run_id, "running", reason))
    return found


def _active_runs(api: PrefectAPI, processor: str) -> list[dict[str, Any]]:
    return api.flow_runs(flow_names=[flow_name(processor)], states=WATCHED_STATES)


def doctor(db: Database, api: PrefectAPI | None = None, *, fix: bool = True) -> DoctorReport:
    """Find zombie runs and leaked slots of our flows; with `fix`, crash the zombies (which
    frees their deployment slots), close their ledger rows and release the leases dead runs
    hold their global slots with. Without `api`, the Prefect API is PREFECT_API_URL's, or
    that of the `serve` running for `db` on this machine."""
    owned = api is None
    api = api or PrefectAPI(api_url(db))
    try:
        return _doctor(db, api, fix)
    finally:
        if owned:
            api.close()


def _doctor(db: Database, api: PrefectAPI, fix: bool) -> DoctorReport:
    report = DoctorReport(fix=fix)
    host = socket.gethostname()
    processors = [e.name for e in registry.entries()]
    runs = {p: _active_runs(api, p) for p in processors}
    watched = {run["id"] for active in runs.values() for run in active}
    rows = _read_ledger(db, watched)
    ledger = {r.flow_run_id: r for r in rows if r.flow_run_id}
    now = datetime.now(UTC)
    dead_rows: list[str] = []
    for processor, active in runs.items():
        for run in active:
            verdict = _judge(run, ledger, db, host, now)
            finding = RunFinding(
                processor, run["id"], run["name"], run["state_type"], verdict.reason
            )
            if verdict.alive is None:
                report.unchecked.append(finding)
            elif not verdict.alive:
                report.zombies.append(finding)
                outcome = _crash(api, run, verdict.reason, report) if fix else None
                if outcome == "settled":  # it ended by itself meanwhile: no zombie after all
                    report.zombies.pop()
                elif outcome == "crashed":
                    report.crashed.append(run["id"])
                    if verdict.ledger is not None:
                        dead_rows.append(verdict.ledger.run_id)
    for finding in stale_ledger(rows, watched, db, host):
        report.stale_ledger.append(finding)
        dead_rows.append(finding.name)
    if fix and dead_rows:
        try:
            report.ledger_closed.extend(close_ledger_rows(db, dead_rows))
        except StateError as error:
            report.errors.append(f"cannot update the run ledger {db}: {error}")
    for processor in processors:
        _check_slot(api, db, host, processor, report)
    return report


def _crash(
    api: PrefectAPI, run: dict[str, Any], reason: str, report: DoctorReport
) -> Literal["crashed", "settled", "failed"]:
    """Force a zombie to Crashed, unless it reached another state meanwhile ("settled": its
    process is gone, so only its runner could have moved it; a completed run stays so)."""
    try:
        current = api.flow_run(run["id"])
        if current.get("state_type") not in WATCHED_STATES:
            return "settled"
        api.force_state(
            run["id"],
            "CRASHED",
            f"session-pipeline doctor: {reason} (the run was left "
            f"{run['state_type'].lower()}; marked Crashed to free its concurrency slot)",
        )
    except PrefectUnavailable as error:
        report.errors.append(f"cannot mark run {run['name']} Crashed: {error}")
        return "failed"
    return "crashed"


def _holds_slot(run: dict[str, Any], ledger: dict[str, LedgerRow]) -> bool:
    """Has the run taken its slot? It names its lease on itself once it has, and writes its
    ledger row after (a run of an older version only the row). A run waiting for the slot
    has neither, and does not keep a dead holder's slot from being reported."""
    return bool((run.get("labels") or {}).get(LEASE_LABEL)) or run["id"] in ledger


def _check_slot(
    api: PrefectAPI, db: Database, host: str, processor: str, report: DoctorReport
) -> None:
    """A processor's global slot taken while no run holding it is alive is leaked. The limit
    is read first: with it full, no new run can take it while the runs are being checked.
    Fixing releases the leases of the dead holders (by id: a lease already gone is left
    alone, so a live run's slot is never freed), never the count."""
    name = limit_name(processor)
    try:
        limit = api.limit(name)
        if limit is None or int(limit.get("active_slots") or 0) <= 0:
            return
        active = _active_runs(api, processor)
        ended = api.flow_runs(
            flow_names=[flow_name(processor)], states=TERMINAL_STATES, limit=RECENT_ENDED_RUNS
        )
        rows = _read_ledger(db, [run["id"] for run in active])
    except (PrefectUnavailable, StateError) as error:
        report.errors.append(f"cannot check slot {name}: {error}")
        return
    ledger = {r.flow_run_id: r for r in rows if r.flow_run_id}
    now = datetime.now(UTC)
    holders = [run for run in active if _holds_slot(run, ledger)]
    if any(_judge(run, ledger, db, host, now).alive is not False for run in holders):
        return  # alive, or on another host / in another ledger: cannot tell, leave it
    if any(
        r.processor == processor
        and r.status == "running"
        and r.flow_run_id not in {run["id"] for run in active}
        and r.host == host
        and r.pid is not None
        and process_alive(r.pid, r.started_at)
        for r in rows
    ):
        return
    dead = [run for run in [*holders, *ended] if (run.get("labels") or {}).get(LEASE_LABEL)]
    # the zombies this pass crashed are no longer active: name them too
    crashed = [z.name for z in report.zombies if z.processor == processor]
    names = dict.fromkeys([*(run["name"] for run in holders), *crashed])
    finding = SlotFinding(processor, name, int(limit["active_slots"]), tuple(names))
    report.leaked_slots.append(finding)
    if not report.fix:
        return
    try:
        for run in dead:
            api.release_lease(str(run["labels"][LEASE_LABEL]))
        after = api.limit(name)
    except PrefectUnavailable as error:
        report.errors.append(f"cannot release slot {name}: {error}")
        return
    if after is not None and int(after.get("active_slots") or 0) == 0:
        report.slots_freed.append(name)
