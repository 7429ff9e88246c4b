"""One Prefect flow per registered processor, generated from the registry.

A run takes the processor's global concurrency slot (strict: a missing limit is created, never
run unprotected), scans, maps one task run per batch of sessions, commits each batch the
moment it completes, and ends with the run's figures in `processor_runs` and as a table
artifact in the Prefect UI.
"""

from __future__ import annotations

from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import Flow, flow, get_run_logger, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.context import TagsContext
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.names import flow_attribute, flow_name, limit_name
from flows.pipeline import Committer, batches, begin, deadline_for
from flows.work import Emit, describe, process_batch
from processors import registry
from processors.base import Processor
from state import config
from state.config import ConfigError
from state.db import StateError
from state.plan import Candidate
from state.store import Outcome, RunFigures

# How long a run waits for its processor's slot before refusing. Generous because acquiring
# goes through the Prefect API, which can be slow under load (SQLite contention on the server).
LOCK_WAIT_SECONDS = 30.0


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
    deadline: float | None,
    commit_segment: Emit | None = None,
) -> list[Outcome]:
    """Read one batch of sessions and return the outcomes; only the segments of a big file
    are committed as they are read (`commit_segment`), so its rows never pile up."""
    return process_batch(processor, batch, deadline, at_least_one=index == 0, emit=commit_segment)


def _ensure_limit(name: str) -> None:
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)


def _artifact(figures: RunFigures) -> None:
    data = figures.as_dict()
    rows = [{"figure": k, "value": v} for k, v in data.items() if k != "errors_detail"]
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


def run_tags(processor_name: str) -> tuple[str, ...]:
    """The tags `run()` gives a flow run (a deployment gives its runs the same ones)."""
    return ("session-pipeline", f"processor:{processor_name}")


def _process(
    processor: Processor,
    candidates: list[Candidate],
    deadline: float | None,
    committer: Committer,
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
            unmapped(deadline),
            unmapped(committer.commit_now),
        )
    batch_of = {id(f): b for f, b in zip(futures, work, strict=True)}
    for future in as_completed(futures):
        try:
            outcomes = future.result()
        except Exception as error:  # a crashed task fails its sessions, not the run
            now = datetime.now(UTC)
            outcomes = [
                Outcome(c.key, "failed", now, error=f"task crashed: {error}")
                for c in batch_of[id(future)]
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
    deadline = deadline_for(time_budget_seconds)
    slot = limit_name(processor_name)
    _ensure_limit(slot)
    with ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(slot, occupy=1, timeout_seconds=LOCK_WAIT_SECONDS, strict=True)
            )
        except TimeoutError:
            raise ProcessorBusyError(f"Processor '{processor_name}' is already running") from None
        run_id, the_plan, committer = begin(
            processor, data_path, db_path, attempts, flow_run.get_id(), logger
        )
        try:
            _process(processor, the_plan.candidates, deadline, committer)
            figures = committer.close(run_id, len(the_plan.candidates))
        except BaseException:
            committer.abort(run_id)
            raise
        slot_held = stack.pop_all()
    try:
        slot_held.close()
    except Exception as error:  # the work is committed: a failed release must not fail the run
        logger.warning(
            "could not release the concurrency slot %s (%s); it frees itself when its lease "
            "expires",
            slot,
            describe(error),
        )
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
    _artifact(figures)
    return figures.as_dict()


def build_flow(processor_name: str) -> Flow[..., dict[str, Any] | State]:
    """The flow of one processor, named `<name>-processor`, its runs `<name>-<timestamp>`."""

    def run_name() -> str:
        return f"{processor_name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"

    @flow(
        name=flow_name(processor_name),
        flow_run_name=run_name,
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
    db: Path | str | None = None,
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
