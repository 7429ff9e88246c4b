"""One Prefect flow per registered processor, generated from the registry.

A run takes the processor's global concurrency slot (strict: a missing limit is created, never
run unprotected), scans, maps one task run per batch of sessions, commits each batch the
moment it completes, and ends with the run's figures in `processor_runs` and as a table
artifact in the Prefect UI.

The slot is a 60 s Prefect lease (the shortest Prefect allows), renewed every 15 s while the
run lives, and named on the flow run (label `session-pipeline.slot-lease`): a run that dies
frees its slot within a minute by itself, at once when the runner reports it Crashed (the
flow's crash hook releases exactly that lease), or when `doctor` finds it dead. A SIGTERM
(serve stopping, a cancellation) ends the run after its current commit: it is Cancelled, and
so is its ledger row.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from prefect import Flow, flow, get_run_logger, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext, TagsContext
from prefect.exceptions import TerminationSignal
from prefect.logging import get_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.names import flow_attribute, flow_name, limit_name, new_run_name
from flows.parallel import read_in_processes, read_processes
from flows.pipeline import Committer, RunLimits, batches, begin, finish, run_limits
from flows.prefect_api import LEASE_LABEL, PrefectAPI, PrefectUnavailable
from flows.progress import Progress, Sink, Snapshot
from flows.work import Emit, describe, process_batch
from processors import registry
from processors.base import Processor
from state import config
from state.config import ConfigError
from state.db import Database, StateError, connect
from state.plan import Candidate
from state.store import Outcome, RunFigures

# How long a run waits for its processor's slot before refusing. Generous because acquiring
# goes through the Prefect API, which can be slow under load (SQLite contention on the server).
LOCK_WAIT_SECONDS = 30.0
# The slot's lease: Prefect's minimum, so a dead holder frees it within a minute; renewed four
# times per lifetime, so a renewal or two may fail (a busy server) without losing it.
LEASE_SECONDS = 60.0
RENEW_SECONDS = 15.0


def read_threads(processor_name: str) -> int:
    """How many task runs of a flow read at once: the processor's `read_threads`, else one.

    Reading is Python under the GIL: a second reader thread only contends with the first and
    with the flow's commits (Prefect's default, a thread per task run, read all 50 batches at
    once and held every outcome until the end). One reader overlaps with the commits instead,
    and its outcomes are committed as they come (figure 3 in docs/benchmarks.md). A processor
    that mostly waits (on an LLM) asks for more.
    """
    for entry in registry.entries():
        if entry.name == processor_name and entry.processor is not None:
            wanted = getattr(entry.processor, "read_threads", 1)
            return wanted if isinstance(wanted, int) and wanted >= 1 else 1
    return 1


class ProcessorBusyError(RuntimeError):
    """Another run of the same processor holds its concurrency slot."""


class RunCancelled(RuntimeError):
    """A SIGTERM stopped the run after its last commit; the message says what was kept."""


def __getattr__(attribute: str) -> Flow[..., dict[str, Any] | State]:
    """Module attributes `<name>_processor` are the flows of registered processors, built on
    first access (PEP 562), so entrypoints work for plugins too."""
    if attribute.endswith("_processor"):
        name = attribute.removesuffix("_processor")
        if any(e.name == name for e in registry.entries()):
            flow_ = build_flow(name)
            globals()[attribute] = flow_
            return flow_
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


@task(
    name="process-sessions",
    cache_policy=NO_CACHE,
    task_run_name="{processor.name}-batch-{index}",
)
def process_sessions(
    processor: Processor,
    index: int,
    batch: list[Candidate],
    limits: RunLimits,
    commit_segment: Emit | None = None,
    stop: threading.Event | None = None,
) -> list[Outcome]:
    """Read one batch of sessions and return the outcomes; only the segments of a big file
    are committed as they are read (`commit_segment`), so its rows never pile up."""
    return process_batch(
        processor,
        batch,
        limits.deadline,
        at_least_one=index == 0,
        emit=commit_segment,
        allowance=limits.allowance,
        stop=stop,
    )


@task(name="read-in-processes", cache_policy=NO_CACHE, task_run_name="{processor.name}-backlog")
def read_backlog(
    processor: Processor,
    candidates: list[Candidate],
    limits: RunLimits,
    workers: int,
    committer: Committer,
    stop: threading.Event,
) -> int:
    """A big backlog of a CPU-bound processor, read by `workers` processes (one task run: the
    per-batch progress is in the figures); returns how many sessions it read."""
    read_in_processes(
        processor, candidates, limits.deadline, workers, committer.add, committer.commit_now, stop
    )
    return len(candidates)


def _ensure_limit(name: str) -> str:
    """Create the limit if missing; returns the API URL this process talks to (also that of
    the temporary server Prefect starts when none is configured)."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
        return str(client.api_url).rstrip("/")


class ProcessorSlot:
    """A processor's global concurrency slot, held through a lease that is named on the flow
    run and renewed by a thread while the run lives."""

    def __init__(self, api_url: str, limit: str, flow_run_id: str | None) -> None:
        self.api = PrefectAPI(api_url)
        self.limit, self.flow_run_id = limit, flow_run_id
        self.lease: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self, timeout: float) -> bool:
        """Take the slot, waiting up to `timeout` seconds; False when it stayed taken."""
        deadline = time.monotonic() + timeout
        while True:
            self.lease = self.api.try_lease(
                self.limit, LEASE_SECONDS, holder_flow_run=self.flow_run_id
            )
            if self.lease is not None:
                break
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.5 + random.random() / 2, max(deadline - time.monotonic(), 0.05)))
        if self.flow_run_id is not None:
            try:
                self.api.set_labels(self.flow_run_id, {LEASE_LABEL: self.lease})
            except PrefectUnavailable as error:  # it still expires within LEASE_SECONDS
                get_logger("session_pipeline").warning("cannot label the run's lease: %s", error)
        self._renewer = threading.Thread(
            target=self._renew, name=f"slot-lease-{self.limit}", daemon=True
        )
        self._renewer.start()
        return True

    def _renew(self) -> None:
        logger = get_logger("session_pipeline")
        while not self._stop.wait(RENEW_SECONDS):
            assert self.lease is not None
            try:
                if not self.api.renew_lease(self.lease, LEASE_SECONDS):
                    self.lost.set()
                    logger.error(
                        "the lease on %s is gone (released by someone else, or it expired): "
                        "another run of this processor may start",
                        self.limit,
                    )
                    return
            except PrefectUnavailable as error:
                logger.warning("could not renew the lease on %s: %s", self.limit, error)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        try:
            if self.lease is not None:
                self.api.release_lease(self.lease)
                self.lease = None
        finally:
            self.api.close()


def release_dead_run(flow_run_id: str, db: Database, status: str = "crashed") -> list[str]:
    """What a run that died leaves behind, released: the lease it held its slot with (named
    on the flow run) and its ledger row, closed as `status` if still 'running'. Safe to call
    for a run that ended properly: a released lease and a closed row stay as they are."""
    from flows.doctor import close_ledger_rows
    from flows.prefect_api import api_url

    done = []
    # The ledger first: once the slot is free, a reader of the ledger must see the run ended.
    if close_ledger_rows(db, [flow_run_id], status=status):
        done.append(f"ledger run {flow_run_id} closed as {status}")
    with PrefectAPI(api_url(db)) as api:
        lease = (api.flow_run(flow_run_id).get("labels") or {}).get(LEASE_LABEL)
        if lease:
            api.release_lease(str(lease))
            done.append(f"released lease {lease}")
    return done


def _on_crashed(flow: Any, flow_run: Any, state: State) -> None:
    """The runner found the run's process dead (SIGKILL, OOM) and marked it Crashed: free its
    slot now, not when its lease runs out, and close its ledger row."""
    logger = get_logger("session_pipeline")
    db = config.db_path((flow_run.parameters or {}).get("db"))
    try:
        for line in release_dead_run(str(flow_run.id), db):
            logger.info("crashed run %s: %s", flow_run.name, line)
    except (PrefectUnavailable, StateError, ConfigError) as error:
        logger.warning(
            "crashed run %s: could not release what it held (%s); its slot frees itself "
            "within %g s, `session-pipeline doctor` closes its ledger row",
            flow_run.name,
            error,
            LEASE_SECONDS,
        )


@contextlib.contextmanager
def _sigterm_sets(stop: threading.Event) -> Iterator[None]:
    """While in the main thread, a SIGTERM sets `stop` instead of raising wherever the run
    happens to be (in a DuckDB commit: "Query interrupted", a Failed run, two tracebacks)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _artifact(figures: RunFigures) -> None:
    data = figures.as_dict()
    rows = [
        {"figure": k, "value": v} for k, v in data.items() if k not in ("errors_detail", "totals")
    ]
    rows += [{"figure": f"sessions read: {k}", "value": v} for k, v in figures.totals.items()]
    create_table_artifact(
        key=f"{figures.processor.replace('_', '-')}-run-figures",
        table=rows,
        description=f"{figures.processor}: {figures.processed} processed, "
        f"{figures.errors} failed, {figures.items_extracted} items",
    )
    if figures.errors_detail:
        create_table_artifact(
            key=f"{figures.processor.replace('_', '-')}-run-errors",
            table=figures.errors_detail[:200],
            description=f"{figures.processor}: sessions that failed in this run",
        )


def _summary_artifact(processor_name: str, db: Database, logger: Any) -> None:
    """The processor's summary for people (`<name>-summary`, markdown), if it has one."""
    from prefect.artifacts import create_markdown_artifact

    from flows.summary import SUMMARIES

    summarize = SUMMARIES.get(processor_name)
    if summarize is None:
        return
    try:
        with connect(db, read_only=True) as con:
            markdown = summarize(con)
        create_markdown_artifact(
            markdown=markdown,
            key=f"{processor_name.replace('_', '-')}-summary",
            description=f"{processor_name}: who used what, last 7 days",
        )
    except Exception as error:  # a summary is a courtesy: it never fails the run
        logger.warning("%s: no summary artifact (%s)", processor_name, describe(error))


def _progress_sinks(processor_name: str, logger: Any) -> list[Sink]:
    """A long run's progress: a log line, and a progress artifact in the UI (made at the
    first report, so a run of a few seconds leaves none behind)."""
    artifact: list[Any] = []

    def to_log(snap: Snapshot, final: bool) -> None:
        if not final:
            logger.info("%s", snap.line())

    def to_artifact(snap: Snapshot, final: bool) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        described = snap.line()
        if not artifact:
            key = f"{processor_name.replace('_', '-')}-run-progress"
            artifact.append(create_progress_artifact(snap.percent, key=key, description=described))
        else:
            update_progress_artifact(artifact[0], snap.percent, description=described)

    return [to_log, to_artifact]


def run_tags(processor_name: str) -> tuple[str, ...]:
    """The tags `run()` gives a flow run (a deployment gives its runs the same ones)."""
    return ("session-pipeline", f"processor:{processor_name}")


def _process(
    processor: Processor,
    candidates: list[Candidate],
    limits: RunLimits,
    committer: Committer,
    stop: threading.Event | None = None,
) -> None:
    """Map the batches over task runs and commit their outcomes as they complete.

    Two things keep a task run's engine work to a few milliseconds. The processor and the
    batches are quoted: they hold no futures, and Prefect would otherwise walk every candidate
    of a batch twice per task run looking for some (~3 s of a 10k-session run). And the task
    runs do not inherit the tags `run()` gives the flow run (a deployed run's task runs have
    none either): a tagged task run asks the API for tag concurrency slots before it starts
    and releases them after, 0.1 to 0.2 s per task run on a busy machine, the reader idle.
    """
    work = batches(candidates)
    tags = TagsContext.get().current_tags - set(run_tags(processor.name))
    with TagsContext(current_tags=tags):
        futures = process_sessions.map(
            unmapped(quote(processor)),
            range(len(work)),
            [quote(batch) for batch in work],
            unmapped(quote(limits)),
            unmapped(committer.commit_now),
            unmapped(quote(stop)),
        )
    batch_of = {id(f.wrapped_future): (f, b) for f, b in zip(futures, work, strict=True)}
    waiting = {f.wrapped_future for f in futures}
    while waiting:
        if stop is not None and stop.is_set():
            for left in waiting:
                left.cancel()  # batches not started yet never start
            return
        done, waiting = concurrent.futures.wait(
            waiting, timeout=0.25, return_when=concurrent.futures.FIRST_COMPLETED
        )
        for wrapped in done:
            future, batch = batch_of[id(wrapped)]
            try:
                outcomes = future.result()
            except Exception as error:  # a crashed task fails its sessions, not the run
                now = datetime.now(UTC)
                outcomes = [
                    Outcome(c.key, "failed", now, error=f"task crashed: {error}") for c in batch
                ]
            committer.add(outcomes)


def run_processor(
    processor_name: str,
    data_dir: str | None,
    db: str | None,
    max_attempts: int | None,
    time_budget_seconds: float | None,
) -> dict[str, Any]:
    logger = get_run_logger()
    processor = registry.get(processor_name)
    data_path, db_path = config.data_dir(data_dir), config.db_path(db)
    attempts = config.max_attempts(max_attempts)
    limits = run_limits(processor, time_budget_seconds)
    limit = limit_name(processor_name)
    held = ProcessorSlot(_ensure_limit(limit), limit, flow_run.get_id())
    stop = threading.Event()
    try:
        if not held.acquire(LOCK_WAIT_SECONDS):
            raise ProcessorBusyError(f"Processor '{processor_name}' is already running")
        with _sigterm_sets(stop):
            run_id, the_plan, committer = begin(
                processor, data_path, db_path, attempts, flow_run.get_id(), logger
            )
            try:
                candidates = the_plan.candidates
                if candidates:
                    sinks = _progress_sinks(processor_name, logger)
                    committer.progress = Progress(processor_name, candidates, sinks, every=5.0)
                workers = read_processes(processor, candidates, limits.allowance is not None)
                if workers > 1:
                    logger.info(
                        "%s: reading %d sessions in %d processes",
                        processor_name,
                        len(candidates),
                        workers,
                    )
                    read_backlog(
                        quote(processor),
                        quote(candidates),
                        quote(limits),
                        workers,
                        quote(committer),
                        quote(stop),
                    )
                else:
                    _process(processor, candidates, limits, committer, stop)
                if stop.is_set():
                    with committer.lock:
                        committer.flush()  # what was read is kept: the next run goes on
                    figures = committer.tally.finish(len(the_plan.candidates))
                    committer.release()
                    finish(db_path, run_id, figures, status="cancelled")
                else:
                    figures = committer.close(run_id, len(the_plan.candidates))
            except BaseException:
                committer.abort(run_id)
                raise
    finally:
        try:
            held.release()
        except Exception as error:  # the work is committed: a failed release must not fail it
            logger.warning(
                "could not release the concurrency slot %s (%s); it frees itself when its "
                "lease expires",
                limit,
                describe(error),
            )
    if stop.is_set():
        message = (
            f"{processor_name}: stopped by SIGTERM after committing {figures.processed} "
            f"session(s); {figures.deferred} left for the next run (cancelled)"
        )
        logger.warning("%s", message)
        raise RunCancelled(message)
    logger.info(
        "%s: scanned %d, processed %d, skipped %d, errors %d, quarantined %d (%d held), "
        "deferred %d, items %d in %.1fs",
        processor_name,
        figures.scanned,
        figures.processed,
        figures.skipped,
        figures.errors,
        figures.quarantined,
        figures.quarantined_held,
        figures.deferred,
        figures.items_extracted,
        figures.duration_seconds,
    )
    if figures.totals:
        from flows.summary import totals_line

        logger.info("%s", totals_line(processor_name, figures.totals))
    _artifact(figures)
    _summary_artifact(processor_name, db_path, logger)
    return figures.as_dict()


def build_flow(processor_name: str) -> Flow[..., dict[str, Any] | State]:
    """The flow of one processor, named `<name>-processor`, its runs `<name>-<timestamp>`."""

    def run_name() -> str:
        """A run named when it was created (the webhook does) keeps its name."""
        context = FlowRunContext.get()
        current = context.flow_run.name if context and context.flow_run else ""
        if re.fullmatch(rf"{re.escape(processor_name)}-\d{{8}}-\d{{6}}(-\w+)?", current):
            return current
        return new_run_name(processor_name)

    @flow(
        name=flow_name(processor_name),
        flow_run_name=run_name,
        on_crashed=[_on_crashed],
        task_runner=ThreadPoolTaskRunner(max_workers=read_threads(processor_name)),
        description=f"Reads new and changed session transcripts with the {processor_name} "
        "processor and commits what it extracts to DuckDB.",
        validate_parameters=True,
    )
    def processor_flow(
        data_dir: str | None = None,
        db: str | None = None,
        max_attempts: int | None = None,
        time_budget_seconds: float | None = None,
    ) -> dict[str, Any] | State:
        try:
            return run_processor(processor_name, data_dir, db, max_attempts, time_budget_seconds)
        except RunCancelled:
            # Prefect's own ending for a SIGTERM: Cancelled when the runner asked for it
            # (serve stopping, a cancel from the UI), one line, no traceback.
            raise TerminationSignal(signal.SIGTERM) from None
        except (ProcessorBusyError, StateError, ConfigError, registry.UnknownProcessorError) as e:
            # An expected refusal: one line in the log and a Failed run, not a traceback.
            get_run_logger().error("%s", e)
            return Failed(message=str(e))

    # Named after its module attribute so Prefect derives a loadable entrypoint from it.
    processor_flow.fn.__name__ = processor_flow.fn.__qualname__ = flow_attribute(processor_name)
    return processor_flow


def flows() -> dict[str, Flow[..., dict[str, Any] | State]]:
    """A flow for every enabled processor."""
    return {e.name: build_flow(e.name) for e in registry.entries() if e.enabled}


class RunRefused(RuntimeError):
    """A run ended without completing; the message says why in one line."""


def run(
    processor_name: str,
    data_dir: Path | str | None = None,
    db: Database | str | None = None,
    max_attempts: int | None = None,
    time_budget_seconds: float | None = None,
) -> dict[str, Any]:
    """Run a processor's flow now, in this process, and return its figures. A run that was
    refused (busy, locked database) raises RunRefused with the one-line reason."""
    from prefect import tags

    registry.get(processor_name)  # unknown or disabled: fail before Prefect starts
    with tags(*run_tags(processor_name)):
        state = build_flow(processor_name)(
            data_dir=str(data_dir) if data_dir else None,
            db=str(db) if db else None,
            max_attempts=max_attempts,
            time_budget_seconds=time_budget_seconds,
            return_state=True,
        )
    if not state.is_completed():
        raise RunRefused(state.message or f"{processor_name} run ended {state.name}")
    return state.result()
