"""Reading a backlog on every core: worker processes read, this process commits.

Reading is Python (GIL-bound), so threads do not add speed to a CPU-bound processor; processes
do. A first run over a large history is cut into batches that worker processes read and
send back as outcomes (their rows already serialized), while this process commits them in
groups as they arrive, and reads the last batches itself whenever it has nothing to commit.
Files bigger than a read segment are read here instead, segment by segment with a commit
after each (their memory stays bounded, and a killed run continues from the last segment),
while the workers go on with the rest.

Not used for a small backlog (starting workers costs more than it saves), for a processor
that waits on the network (it reads in threads), or under a read cap shared by the readers.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime

from flows.work import SEGMENT_BYTES, process_batch
from processors.base import Processor
from state.config import positive_int
from state.plan import Candidate
from state.store import Outcome, serialize_rows

log = logging.getLogger("session_pipeline.parallel")

# Below this much to read, one process: workers start in ~0.1 s each and their outcomes are
# pickled back, which only pays on a backlog.
MIN_PARALLEL_BYTES = 64 << 20
# Batches per worker, of about equal bytes: enough that a reader finishing early finds more
# (and that the last batch, which the others wait for, is short), few enough that each
# batch's outcomes travel in one piece.
BATCHES_PER_WORKER = 16


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_processes(processor: Processor, candidates: Sequence[Candidate], capped: bool) -> int:
    """How many processes should read this backlog: `SESSION_PIPELINE_READ_PROCESSES` when
    set, else every core for a big enough backlog of a CPU-bound, uncapped processor, else 1."""
    if getattr(processor, "read_threads", 1) > 1 or capped:
        return 1
    if "SESSION_PIPELINE_READ_PROCESSES" in os.environ:
        return positive_int("SESSION_PIPELINE_READ_PROCESSES", 1)
    if sum(c.size for c in candidates) < MIN_PARALLEL_BYTES or len(candidates) < 2:
        return 1
    return cores()


def transferable(processor: Processor, outcomes: list[Outcome]) -> list[Outcome]:
    """Outcomes as a worker sends them: their rows already serialized, so the committing
    process (the busiest one: it also unpickles and commits) never turns them into objects."""
    return serialize_rows(processor.tables, outcomes)


def read_batch(
    processor: Processor, batch: Sequence[Candidate], deadline: float | None
) -> list[Outcome]:
    """A worker's read of one batch (`process_batch`), ready to send back."""
    return transferable(processor, process_batch(processor, batch, deadline))


def cut(small: Sequence[Candidate], count: int) -> list[list[Candidate]]:
    """The candidates, in their order, cut into about `count` batches of about equal bytes
    (cut by number of files, the batch holding a corpus's one 20 MB file took several times
    as long as the others and was the last to finish)."""
    target = max(1, math.ceil(sum(c.size for c in small) / max(1, count)))
    batches: list[list[Candidate]] = []
    current: list[Candidate] = []
    size = 0
    for candidate in small:
        current.append(candidate)
        size += candidate.size
        if size >= target:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def _take_last(waiting: list[Future[list[Outcome]]]) -> Future[list[Outcome]] | None:
    """The last batch no worker has started, taken back from the pool (None: all started)."""
    while waiting:
        future = waiting.pop()
        if future.cancel():
            return future
        waiting.clear()  # the pool starts batches in order: the earlier ones have started too
    return None


def _failed(batch: Sequence[Candidate], error: BaseException) -> list[Outcome]:
    now = datetime.now(UTC)
    log.warning("a reader process failed (%s); its %d sessions fail", error, len(batch))
    return [Outcome(c.key, "failed", now, error=f"reader process failed: {error}") for c in batch]


def read_in_processes(
    processor: Processor,
    candidates: Sequence[Candidate],
    deadline: float | None,
    workers: int,
    add: Callable[[Sequence[Outcome]], None],
    commit_now: Callable[[Outcome], None],
    stop: threading.Event | None = None,
) -> None:
    """Read every candidate, `workers` processes for the files of at most a segment and this
    process for bigger ones; hand each batch's outcomes to `add` as it completes. Whenever
    this process has nothing to commit (while the workers start, and at the end), it reads
    the last batch no worker has started. Once `stop` is set, batches not started yet are
    dropped (the ones being read finish)."""
    big = [c for c in candidates if c.size > SEGMENT_BYTES]
    small = [c for c in candidates if c.size <= SEGMENT_BYTES]
    batches = cut(small, workers * BATCHES_PER_WORKER)
    # forkserver: a fresh, single-threaded parent for the workers (forking this process,
    # which may hold DuckDB's and Prefect's threads, is not safe).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["flows.parallel"])
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures: dict[Future[list[Outcome]], list[Candidate]] = {
            pool.submit(read_batch, processor, batch, deadline): batch for batch in batches
        }
        waiting = list(futures)  # not started yet, in order: this process takes the last
        for candidate in big:  # read here meanwhile, a segment and a commit at a time
            add(process_batch(processor, [candidate], deadline, emit=commit_now, stop=stop))
        left = set(futures)
        workers_read = 0  # batches the workers sent back: is the pool working at all?
        fallback = False
        while left:
            if stop is not None and stop.is_set():
                for future in left:
                    future.cancel()
            done = {f for f in left if f.done()}
            if not done:
                taken = _take_last(waiting)
                if taken is not None:  # read here rather than wait
                    left.discard(taken)
                    add(process_batch(processor, futures[taken], deadline, stop=stop))
                    continue
                done, _ = wait(left, return_when=FIRST_COMPLETED)
            for future in done:
                left.discard(future)
                if future.cancelled():  # never started: its sessions wait for the next run
                    continue
                try:
                    outcomes = future.result()
                    workers_read += 1
                except BrokenProcessPool as error:
                    if workers_read:  # worked, then a worker died (say, killed): as below
                        outcomes = _failed(futures[future], error)
                    else:  # never worked: read here what it cannot
                        if not fallback:
                            log.warning(
                                "reader processes could not start (%s; a script calling "
                                "run_direct needs `if __name__ == '__main__':`); reading in "
                                "this process",
                                error,
                            )
                        fallback = True
                        outcomes = process_batch(processor, futures[future], deadline, stop=stop)
                except Exception as error:  # a worker died: its batch fails, not the run
                    outcomes = _failed(futures[future], error)
                add(outcomes)
