"""One run of one processor, as plain functions: begin (ledger entry, migrate, scan, plan),
read in batches, commit what was read in groups, close (last commit, figures in the ledger).

The Prefect flow in `flows.processor_flow` composes exactly these steps, mapping the batch
reads across task runs; `run_direct` composes them in a loop without Prefect (benchmarks and
fast tests use it, and it is the baseline the flow's overhead is measured against).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from flows import request_copies
from flows.progress import Progress, Sink
from flows.retention import apply_retention, retention_days
from flows.summary import RUN_TOTALS
from flows.work import ReadAllowance, process_batch
from processors.base import Processor, is_append_safe
from state import config, store
from state.config import ConfigError
from state.db import Database, connect, processor_lock, transaction
from state.migrations import migrate
from state.plan import Candidate, Plan, StoredState, plan
from state.scan import scan, scan_changed
from state.store import Outcome, RunFigures

log = logging.getLogger("session_pipeline.pipeline")

# A task run costs up to ~15 ms of engine work here (state changes, events) and ~45 KB; 200
# of them were a third of a 10k-session run's overhead (figure 3), and a backlog cut finer
# than 50 batches shows no more progress in the UI than this does.
MAX_TASK_RUNS = 50
MAX_BATCH = 2000


LAYOUT = "<data-dir>/<user>/<session>.jsonl"


def check_run_settings(max_attempts: int | None = None) -> None:
    """Every setting a run reads, checked before it does any work (state/config.py's, and
    the retention of usage rows)."""
    config.check_run_settings(max_attempts)
    retention_days()


def check_data_dir(data_dir: Path) -> None:
    """A data dir that is missing, unreadable or laid out one level too deep is a
    configuration error, not an empty one (a typo must not pass as "scanned 0"). An empty
    folder is valid: nobody has sessions yet."""
    if not data_dir.exists():
        raise ConfigError(f"data dir {data_dir} does not exist (expected {LAYOUT})")
    if not data_dir.is_dir():
        raise ConfigError(f"data dir {data_dir} is not a directory")
    try:
        with os.scandir(data_dir) as entries:
            top = list(entries)
    except OSError as error:
        raise ConfigError(f"cannot read data dir {data_dir}: {error.strerror}") from None
    if any(e.name.endswith(".jsonl") and e.is_file() for e in top) and not any(
        _holds_sessions(e) for e in top
    ):
        raise ConfigError(
            f"data dir {data_dir} holds .jsonl files itself but no user folders with "
            f"sessions: expected {LAYOUT} (is it one user's folder, one level too deep?)"
        )


def _holds_sessions(entry: os.DirEntry[str]) -> bool:
    """A user folder: a folder with `.jsonl` files directly inside."""
    try:
        if not entry.is_dir():
            return False
        with os.scandir(entry.path) as inside:
            return any(e.name.endswith(".jsonl") for e in inside)
    except OSError:
        return False


def prepare(
    processor: Processor, data_dir: Path, db: Database, ledger: LedgerEntry | None = None
) -> Plan:
    """Plan a run in one visit to the database: migrate, enter the run in the ledger, load
    what this processor version last read well, scan comparing stats against it, and load
    whole state rows (and checkpoints) only for the sessions that differ. The connection is
    held during the scan (about a second per 100k files): opening another costs more."""
    check_data_dir(data_dir)
    with connect(db) as con:
        return _prepare(con, processor, data_dir, ledger)


def _prepare(
    con: duckdb.DuckDBPyConnection,
    processor: Processor,
    data_dir: Path,
    ledger: LedgerEntry | None,
) -> Plan:
    migrate(con)
    # Output tables and the ledger entry in one transaction: one WAL fsync, not two.
    with transaction(con):
        rebuilt = store.ensure_outputs(con, processor)
        if ledger is not None:
            store.start_run(
                con,
                ledger.run_id,
                processor,
                started_at=ledger.started_at,
                flow_run_id=ledger.flow_run_id,
            )
    try:
        return _plan(con, processor, data_dir, rebuilt)
    except BaseException:
        if ledger is not None:
            store.finish_run(
                con, ledger.run_id, None, finished_at=datetime.now(UTC), status="failed"
            )
        raise


def _plan(
    con: duckdb.DuckDBPyConnection, processor: Processor, data_dir: Path, rebuilt: list[str]
) -> Plan:
    version = str(processor.version)
    settled, present = store.load_settled(con, processor.name, version)
    changed, scanned = scan_changed(data_dir, settled)
    del settled
    the_plan = Plan()
    saved: dict[str, bytes] = {}
    states: dict[str, StoredState] = {}
    if changed:
        states = store.load_states(con, processor.name, [f.key for f in changed])
        the_plan = plan(changed, states, version, append_safe=is_append_safe(processor))
        appends = [c.key for c in the_plan.candidates if c.reason == "append"]
        saved = store.load_checkpoints(con, processor.name, appends)
    the_plan.scanned = scanned
    the_plan.unchanged += scanned - len(changed)
    # Every unchanged file is known; when the state knows more sessions than are here, some
    # files are gone: only then is the data dir walked again, for the keys of all of them.
    here = scanned - len(changed) + sum(s.status != "missing" for s in states.values())
    if present > here:
        gone = store.mark_missing(con, processor.name, [f.key for f in scan(data_dir)])
        if gone:
            log.warning(
                "%s: %d session file(s) are gone from the data dir (first: %s); their rows "
                "are kept and their state is now 'missing'",
                processor.name,
                len(gone),
                gone[0],
            )
    if rebuilt:
        log.warning(
            "%s: output tables %s changed shape; every session will be reprocessed",
            processor.name,
            ", ".join(rebuilt),
        )
    if saved:
        the_plan.candidates = [
            replace(c, checkpoint=saved.get(c.key)) if c.reason == "append" else c
            for c in the_plan.candidates
        ]
    reasons: dict[str, int] = {}
    for c in the_plan.candidates:
        reasons[c.reason] = reasons.get(c.reason, 0) + 1
    log.info(
        "%s: scanned %d session files; %d unchanged, %d to read (%s), %d quarantined",
        processor.name,
        the_plan.scanned,
        the_plan.unchanged,
        len(the_plan.candidates),
        ", ".join(f"{n} {r}" for r, n in reasons.items()) or "none",
        len(the_plan.held),
    )
    return the_plan


def batches(
    candidates: Sequence[Candidate], max_tasks: int = MAX_TASK_RUNS
) -> list[list[Candidate]]:
    """A small backlog gets one session per task run (fine-grained progress in the UI); a big
    one is cut into at most `max_tasks` batches, so a run never floods the Prefect server."""
    if not candidates:
        return []
    size = min(MAX_BATCH, max(1, math.ceil(len(candidates) / max_tasks)))
    return [list(candidates[i : i + size]) for i in range(0, len(candidates), size)]


@dataclass
class Tally:
    """Accumulates a run's figures as batches are committed."""

    figures: RunFigures
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log
    attempted: int = 0
    read_keys: list[str] = field(default_factory=list)  # sessions read, for the run's totals
    started: float = field(default_factory=time.monotonic)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def start(
        cls,
        processor: Processor,
        the_plan: Plan,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> Tally:
        figures = RunFigures(
            processor=processor.name,
            scanned=the_plan.scanned,
            skipped=the_plan.unchanged,
            quarantined_held=len(the_plan.held),
        )
        return cls(figures, logger)

    def add(
        self, outcomes: Sequence[Outcome], quarantined: Sequence[str], max_attempts: int
    ) -> None:
        newly = set(quarantined)
        self.figures.quarantined += len(newly)
        self.figures.quarantined_held += len(newly)
        # A segment of a big file is not a session read: the session counts with its last one.
        self.attempted += sum(1 for o in outcomes if not o.partial)
        for o in outcomes:
            if o.partial:
                self.logger.info(
                    "session %s: committed its first %d bytes (a big file is read in segments)",
                    o.key,
                    o.complete_offset or 0,
                )
            elif o.status == "processed":
                self.read_keys.append(o.key)
                self.figures.processed += 1
                self.figures.items_extracted += o.items
            elif o.status == "unchanged":
                self.figures.skipped += 1
            else:
                self.figures.errors += 1
                error = o.error or "unknown error"
                if o.key in newly:
                    error += f" (quarantined after {max_attempts} attempts)"
                self.logger.warning("session %s failed: %s", o.key, error)
                self.figures.errors_detail.append({"session": o.key, "error": error})

    def finish(self, candidates: int) -> RunFigures:
        self.figures.deferred = candidates - self.attempted
        self.figures.duration_seconds = time.monotonic() - self.started
        return self.figures


class Committer:
    """Commits a run's outcomes in groups, each group in one transaction.

    Opening the state database costs tens of milliseconds and closing it a checkpoint, so
    committing every task's outcomes (one session per task for a small backlog) spent 90% of
    a run there. Outcomes wait until GROUP_ROWS rows have gathered or `commit_seconds` have
    passed (`SESSION_PIPELINE_COMMIT_SECONDS`, default 5), and the rest go at `close()`. A
    crash loses at most that much work, which the next run redoes; the connection is still
    held only while committing, so other processes share the file. The one exception is
    `held`: a run with nothing to read ends on the connection it planned with.
    """

    GROUP_ROWS = 50_000

    def __init__(
        self,
        db: Database,
        processor: Processor,
        max_attempts: int,
        tally: Tally,
        held: duckdb.DuckDBPyConnection | None = None,
        closing: ExitStack | None = None,
    ) -> None:
        self.db, self.processor, self.max_attempts, self.tally = db, processor, max_attempts, tally
        self.held, self._closing = held, closing if closing is not None else ExitStack()
        self.commit_seconds = config.commit_seconds()
        self.pending: list[Outcome] = []
        self.rows = 0
        self.since = time.monotonic()
        self.lock = threading.Lock()  # segments are committed from the threads reading them
        self.progress: Progress | None = None  # told of every outcome as it arrives
        # what the sessions the run read add up to (flows/summary.py RUN_TOTALS)
        self.totals: Callable[[duckdb.DuckDBPyConnection, list[str]], dict[str, Any]] | None
        self.totals = RUN_TOTALS.get(processor.name)

    def add(self, outcomes: Sequence[Outcome]) -> None:
        if self.progress is not None:
            self.progress.advance(outcomes)
        with self.lock:
            self.pending.extend(outcomes)
            self.rows += sum(o.row_count for o in outcomes)
            if self.rows >= self.GROUP_ROWS or time.monotonic() - self.since >= self.commit_seconds:
                self.flush()

    def commit_now(self, outcome: Outcome) -> None:
        """Commit a segment of a big file, with whatever else is pending, before the reader
        goes on: its rows leave memory and the run can be resumed from it."""
        if self.progress is not None:
            self.progress.advance([outcome])
        with self.lock:
            self.pending.append(outcome)
            self.flush()

    @contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self.held is not None:
            yield self.held
        else:
            with connect(self.db) as con:
                yield con

    def release(self) -> None:
        """Close the held connection, if any (safe to call twice)."""
        self.held = None
        self._closing.close()

    def abort(self, run_id: str) -> None:
        """The run failed: release what it holds and mark it failed in the ledger."""
        self.release()
        finish(self.db, run_id, None, status="failed")

    def close(self, run_id: str, candidates: int) -> RunFigures:
        """Commit what is left and close the run's ledger entry, on one connection."""
        if self.progress is not None:
            self.progress.finish()
        try:
            return self._close(run_id, candidates)
        finally:
            self.release()

    def _close(self, run_id: str, candidates: int) -> RunFigures:
        # The last outcomes and the ledger's end in one transaction: each commit is a WAL
        # fsync (10 to 25 ms here), a good part of a small run.
        with self.lock, self._connection() as con, transaction(con):
            self._apply_pending(con)
            if self.processor.name == "usage":  # USAGE_EVENTS_RETENTION_DAYS, in this commit
                pruned = apply_retention(con)
                if pruned is not None:
                    self.tally.logger.info("%s", pruned.describe())
            figures = self.tally.finish(candidates)
            if self.totals is not None and self.tally.read_keys:
                figures.totals = self.totals(con, self.tally.read_keys)
            store.finish_run(con, run_id, figures, finished_at=datetime.now(UTC))
        return figures

    def flush(self) -> None:
        self.since = time.monotonic()
        if self.pending:
            with self._connection() as con, transaction(con):
                self._apply_pending(con)

    def _apply_pending(self, con: duckdb.DuckDBPyConnection) -> None:
        """Apply the pending outcomes in the caller's transaction and count them."""
        outcomes, self.pending, self.rows = self.pending, [], 0
        if outcomes:
            copies = self.processor.name == "usage"
            if copies:
                whole, keys = request_copies.touched(outcomes)
                copies = bool(whole or keys[0])
            if copies:
                request_copies.note_before(con, whole, keys)
            quarantined = store.apply_batch(con, self.processor, outcomes, self.max_attempts)
            if copies:
                request_copies.refresh_after(con, whole)
            self.tally.add(outcomes, quarantined, self.max_attempts)


@dataclass(frozen=True)
class LedgerEntry:
    run_id: str
    started_at: datetime
    flow_run_id: str | None = None


def begin(
    processor: Processor,
    data_dir: Path,
    db: Database,
    max_attempts: int,
    flow_run_id: str | None = None,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
) -> tuple[str, Plan, Committer]:
    """Take the processor's lock on this host, enter the run in the ledger (its id is the
    flow run's when there is one), plan it, and make the committer that ends it (and lets go
    of the lock). A run with nothing to read (most scheduled runs) keeps its planning
    connection for its end: opening DuckDB again would cost ~30 ms, and its close a
    checkpoint, for the one ledger update."""
    ledger = LedgerEntry(flow_run_id or str(uuid.uuid4()), datetime.now(UTC), flow_run_id)
    started = time.monotonic()
    check_run_settings(max_attempts)
    check_data_dir(data_dir)
    closing = ExitStack()  # what the committer lets go of at the end: the lock last
    closing.enter_context(processor_lock(db, processor.name))
    held: duckdb.DuckDBPyConnection | None = None
    try:
        with ExitStack() as planning:
            con = planning.enter_context(connect(db))
            the_plan = _prepare(con, processor, data_dir, ledger)
            if not the_plan.candidates:
                held = con
                closing.push(planning.pop_all())
    except BaseException:
        closing.close()
        raise
    tally = Tally.start(processor, the_plan, logger)
    tally.started, tally.started_at = started, ledger.started_at
    return ledger.run_id, the_plan, Committer(db, processor, max_attempts, tally, held, closing)


def finish(
    db: Database, run_id: str, figures: RunFigures | None, status: str = "completed"
) -> None:
    with connect(db) as con:
        store.finish_run(con, run_id, figures, finished_at=datetime.now(UTC), status=status)


def deadline_for(time_budget_seconds: float | None) -> float | None:
    return time.time() + time_budget_seconds if time_budget_seconds else None


@dataclass(frozen=True)
class RunLimits:
    """Where a run stops starting sessions: a deadline (epoch seconds) and a read allowance."""

    deadline: float | None = None
    allowance: ReadAllowance | None = None


def run_limits(processor: Processor, time_budget_seconds: float | None = None) -> RunLimits:
    """A run's limits. The time budget: the flag or deployment parameter, else
    `SESSION_PIPELINE_<NAME>_TIME_BUDGET` (0: none), else the processor's
    `time_budget_share` of the longest gap between its scheduled runs (verification: so a run
    ends before the next is due), else none. The read cap: `SESSION_PROCESSOR_MAX_PER_RUN`,
    except for a processor that is local and cheap (`uncapped`, as usage is)."""
    from flows.cadence import cadence

    budget: float | None = time_budget_seconds
    if budget is None:
        budget = config.time_budget(processor.name)
    if budget is None and getattr(processor, "time_budget_share", None):
        budget = processor.time_budget_share * cadence(processor).gap_seconds  # type: ignore[attr-defined]
    cap = None if getattr(processor, "uncapped", False) else config.max_per_run()
    return RunLimits(deadline_for(budget), ReadAllowance(cap) if cap is not None else None)


def run_direct(
    processor: Processor,
    data_dir: Path,
    db: Database,
    *,
    max_attempts: int,
    time_budget_seconds: float | None = None,
    progress: Sequence[Sink] = (),
) -> RunFigures:
    """The whole run in this process, without Prefect; `progress` is told how far it got."""
    from flows.parallel import read_in_processes, read_processes

    run_id, the_plan, committer = begin(processor, data_dir, db, max_attempts)
    limits = run_limits(processor, time_budget_seconds)
    deadline = limits.deadline
    candidates = the_plan.candidates
    if progress and candidates:
        committer.progress = Progress(processor.name, candidates, progress)
    workers = read_processes(processor, candidates, capped=limits.allowance is not None)
    try:
        if workers > 1:
            log.info(
                "%s: reading %d sessions in %d processes", processor.name, len(candidates), workers
            )
            read_in_processes(
                processor, candidates, deadline, workers, committer.add, committer.commit_now
            )
            return committer.close(run_id, len(candidates))
        for number, batch in enumerate(batches(candidates)):
            if number and deadline is not None and time.time() >= deadline:
                break
            committer.add(
                process_batch(
                    processor,
                    batch,
                    deadline,
                    at_least_one=number == 0,
                    emit=committer.commit_now,
                    allowance=limits.allowance,
                )
            )
        return committer.close(run_id, len(the_plan.candidates))
    except BaseException:
        committer.abort(run_id)
        raise
