"""Figures 10 to 12: the state in PostgreSQL (issue 15), each a ratio of two sides measured
alternately in the same run, like the others (`bench/run.py`).

10. `usage` end to end (`run_direct`) into a new PostgreSQL schema vs into a new DuckDB file,
    over figure 2's corpus: PostgreSQL's throughput as a share of DuckDB's
11. a run with nothing changed over figure 1's corpus (100k sessions), its state in
    PostgreSQL, vs figure 1's bare scandir+stat walk
12. two worker processes (`session-pipeline run usage` and `session-pipeline run
    verification`, started at once on one schema) vs one worker process running both backlogs
    one after the other (`session-pipeline run --all`)

The server is `$BENCH_POSTGRES` (else the tests' `$SESSION_PIPELINE_TEST_POSTGRES`, else
`postgresql://postgres@127.0.0.1:5432/postgres`); when it does not answer the three figures
are skipped with the reason. Each side works in a schema of its own (`bench_…`), dropped when
it is done, except figure 11's state: a full `usage` run over 100k sessions takes minutes, so
it is kept between runs in `bench_state_…`, as figure 1 keeps its DuckDB file (drop it with
`DROP SCHEMA … CASCADE`; the figure's notes name it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from bench.corpus import MB, Corpus, corpus

if TYPE_CHECKING:
    from bench.run import Bench, Row

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Figure 12: the verification backlog a worker takes in one run is the default read cap of a
# capped processor (SESSION_PROCESSOR_MAX_PER_RUN), as in production.
VERIFICATION_PER_RUN = 50


def server_url() -> str:
    return (
        os.environ.get("BENCH_POSTGRES")
        or os.environ.get("SESSION_PIPELINE_TEST_POSTGRES")
        or DEFAULT_URL
    )


def unreachable(url: str) -> str | None:
    """Why the server cannot be used, in one line, or None."""
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3) as con:
            con.execute("SELECT 1")
    except Exception as error:  # any failure is a reason to skip, said in one line
        text = str(error).strip()
        return text.splitlines()[0].strip() if text else type(error).__name__
    return None


def schema_url(base: str, schema: str) -> str:
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}options={quote(f'-csearch_path={schema}', safe='')}"


class Schemas:
    """Schemas made for one figure, each dropped when its side is done (and any left at the
    end)."""

    def __init__(self, base: str, tag: str) -> None:
        self.base, self.tag = base, tag
        self.made: list[str] = []

    def new(self) -> tuple[str, Any]:
        from state.db import location

        name = f"bench_{self.tag}_{os.getpid()}_{len(self.made)}"
        self.drop(name)  # a leftover of a killed run with the same pid
        self.made.append(name)
        return name, location(schema_url(self.base, name))

    def drop(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.base, autocommit=True) as con:
            con.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        if name in self.made:
            self.made.remove(name)

    def close(self) -> None:
        for name in list(self.made):
            self.drop(name)


def server_settings(base: str) -> str:
    import psycopg

    with psycopg.connect(base) as con:
        version = con.execute("SHOW server_version").fetchone()
        rows = con.execute(
            "SELECT name, setting, unit FROM pg_settings WHERE name IN "
            "('shared_buffers', 'synchronous_commit', 'fsync', 'max_wal_size', 'work_mem')"
            " ORDER BY name"
        ).fetchall()
    parts = []
    for name, setting, unit in rows:
        if unit == "8kB":
            setting = f"{int(setting) * 8 // 1024} MB"
        elif unit == "kB":
            setting = f"{int(setting) // 1024} MB"
        elif unit == "MB":
            setting = f"{setting} MB"
        parts.append(f"{name} {setting}")
    from state.postgres_backend import PostgresDatabase

    local = "127.0.0.1" in base or "localhost" in base
    where = "this machine (the same cores)" if local else PostgresDatabase(base).masked
    return f"PostgreSQL {version[0] if version else '?'} on {where}, {', '.join(parts)}"


# --- timing functions inside a run, without a profiler -------------------------------------------


class Timers:
    """Seconds spent in (and calls of) chosen functions while active, summed; the originals are
    put back on exit. For where a run's time goes on each backend, at a cost of microseconds
    per call."""

    def __init__(self, targets: list[tuple[Any, str, str]]) -> None:
        self.targets = targets
        self.spent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth: dict[str, int] = defaultdict(int)  # a call inside one of the same label
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Timers:
        for owner, name, label in self.targets:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._timed(original, label))
        return self

    def _timed(self, original: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth[label]:  # counted by the outer call already
                return original(*args, **kwargs)
            self._depth[label] += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[label] += time.perf_counter() - started
                self.calls[label] += 1
                self._depth[label] -= 1

        return timed

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def commit_targets() -> list[tuple[Any, str, str]]:
    """The steps of a commit, on either backend."""
    from flows import pipeline, request_copies
    from state import duckdb_backend, postgres_backend, store

    targets: list[tuple[Any, str, str]] = [
        (pipeline.Committer, "flush", "commits"),
        (pipeline.Committer, "close", "commits"),
        (request_copies, "note_before", "request copies"),
        (request_copies, "refresh_after", "request copies"),
        (store, "_upsert_read", "state rows"),
        (store, "_replace_checkpoints", "checkpoints"),
        (postgres_backend, "_open", "connections"),
    ]
    for module in (duckdb_backend, postgres_backend):
        targets += [
            (module, "insert_columns", "rows in"),
            (module, "insert_documents", "rows in"),
            (module, "delete_by_key", "increments' rows out"),
        ]
    return targets


def tick_targets() -> list[tuple[Any, str, str]]:
    """The steps of a run with nothing to read."""
    from flows import pipeline
    from state import postgres_backend, store

    return [
        (postgres_backend, "_open", "connections"),
        (pipeline, "migrate", "migrations check"),
        (store, "ensure_outputs", "tables and views"),
        (store, "load_settled", "load_settled"),
        (pipeline, "scan_changed", "scan"),
        (pipeline.Committer, "close", "ledger end"),
    ]


def seconds_in(timers: list[Timers], label: str) -> tuple[float, float]:
    """Median over rounds of the seconds spent in a step, and of its calls."""
    from bench.run import med

    return (
        med([t.spent.get(label, 0.0) for t in timers]),
        med([float(t.calls.get(label, 0)) for t in timers]),
    )


def spent(timers: list[Timers], total: float, outer: str | None = None) -> str:
    """Medians over rounds of the seconds in each step, with their share of the run; with
    `outer`, that step first and the others as parts of it (connections apart)."""
    labels = list(dict.fromkeys(label for t in timers for label in t.spent))
    parts = []
    for label in labels:
        if label in (outer, "connections"):
            continue
        seconds, calls = seconds_in(timers, label)
        parts.append(f"{label} {seconds:.2f} s ({100 * seconds / total:.0f}%, {calls:g} calls)")
    text = ", ".join(parts)
    if outer is not None:
        seconds, calls = seconds_in(timers, outer)
        text = (
            f"{outer} {seconds:.2f} s ({100 * seconds / total:.0f}% of the run, {calls:g} of "
            "them); "
            f"in them: {text}"
        )
    if "connections" in labels:
        seconds, calls = seconds_in(timers, "connections")
        text += f"; {calls:g} connections opened in {seconds:.2f} s"
    return text


# --- the figures -------------------------------------------------------------------------------


TITLES = {
    "10": "usage end to end (run_direct) into PostgreSQL vs into DuckDB, same corpus",
    "11": "no-change run over {sessions:,} sessions, state in PostgreSQL, vs scandir+stat",
    "12": "two workers (one processor each, at once) vs one worker running both backlogs",
}
GOALS = {"10": "≥ 0.7× DuckDB", "11": "≤ 2×", "12": "≥ 1.6× faster"}


def figure(bench: Bench, number: str) -> list[Row]:
    base = server_url()
    title = TITLES[number].format(sessions=bench.sizes.sessions)
    why = unreachable(base)
    if why is not None:
        from state.postgres_backend import PostgresDatabase

        where = PostgresDatabase(base).masked  # no password in the doc
        return bench.skipped(number, title, GOALS[number], f"PostgreSQL at {where}: {why}")
    run = {"10": fig10, "11": fig11, "12": fig12}[number]
    return run(bench, base, title)


def throughput_corpus(bench: Bench) -> Corpus:
    """Figure 2's corpus (its generator and size): a DuckDB run over it takes ~6 to 15 s."""
    from bench.run import log

    return corpus(bench.sizes.fig2_sessions, max_bytes=bench.sizes.fig2_max, log=log)


def fig10(bench: Bench, base: str, title: str) -> list[Row]:
    from bench.run import (
        alternate,
        check,
        direct,
        drop_db,
        fmt_rounds,
        fmt_s,
        log,
        med,
        per_round,
    )

    c = throughput_corpus(bench)
    log(f"figure 10: usage into PostgreSQL vs DuckDB over {bench.describe(c)}")
    schemas = Schemas(base, "fig10")
    timers: dict[str, list[Timers]] = {"postgresql": [], "duckdb": []}

    def postgresql() -> float:
        name, db = schemas.new()
        try:
            with Timers(commit_targets()) as t:
                seconds, figures = direct(c.path, db)
            check(figures, processed=c.files)
            timers["postgresql"].append(t)
            return seconds
        finally:
            schemas.drop(name)

    def duckdb() -> float:
        db = bench.work.db("fig10")
        try:
            with Timers(commit_targets()) as t:
                seconds, figures = direct(c.path, db)
            check(figures, processed=c.files)
            timers["duckdb"].append(t)
            return seconds
        finally:
            drop_db(db)

    try:
        t = alternate({"postgresql": postgresql, "duckdb": duckdb}, bench.repeats)
    finally:
        schemas.close()
    ratios = per_round(t["duckdb"], t["postgresql"])
    ratio = med(ratios)
    mb = c.bytes / MB
    notes = [
        bench.describe(c),
        server_settings(base),
        "`run_direct` of usage into a new schema (`SESSION_PIPELINE_DB=postgresql://…"
        "?options=-csearch_path%3D…`) vs into a new DuckDB file, both reading in as many "
        f"processes as the run chooses (every core); per-round ratios {fmt_rounds(ratios, '×')}",
        f"PostgreSQL run by step (medians of rounds, of {fmt_s(med(t['postgresql']))}): "
        + spent(timers["postgresql"], med(t["postgresql"]), "commits"),
        f"DuckDB run by step (of {fmt_s(med(t['duckdb']))}): "
        + spent(timers["duckdb"], med(t["duckdb"]), "commits"),
    ]
    return [
        bench.row(
            "10",
            title,
            measured=f"{mb / med(t['postgresql']):.1f} MB/s PostgreSQL",
            baseline=f"{mb / med(t['duckdb']):.1f} MB/s DuckDB",
            ratio=f"{ratio:.2f}×",
            goal=GOALS["10"],
            passed=ratio >= 0.7,
            notes=notes,
        )
    ]


def state_schema(c: Corpus) -> str:
    """Figure 11's kept state: one schema per corpus and usage version."""
    from processors import registry

    version = registry.get("usage").version
    digest = hashlib.sha256(f"{c.path.name}/usage{version}".encode()).hexdigest()[:10]
    return f"bench_state_{digest}"


def fig11(bench: Bench, base: str, title: str) -> list[Row]:
    from bench.run import (
        alternate,
        bare_walk,
        check,
        direct,
        fmt_rounds,
        fmt_s,
        log,
        med,
        per_round,
    )
    from state.db import location

    s = bench.sizes
    c = corpus(s.sessions, max_bytes=s.fig1_max, median_bytes=s.fig1_median, log=log)
    schema = state_schema(c)
    db = location(schema_url(base, schema))
    log(f"figure 11: bringing schema {schema} up to date over {bench.describe(c)}")
    seconds, figures = direct(c.path, db)
    check(figures, scanned=c.files)
    if figures["processed"] == 0:
        full_note = f"state already up to date (schema {schema}, kept from an earlier run)"
    else:
        full_note = (
            f"bringing the state up to date took {fmt_s(seconds)} ({figures['processed']:,} "
            f"sessions processed, {c.bytes / MB / seconds:.1f} MB/s when all were); the "
            f"schema {schema} is kept for the next run"
        )
    timers: list[Timers] = []

    def run() -> float:
        with Timers(tick_targets()) as t:
            seconds, figures = direct(c.path, db)
        check(figures, processed=0, scanned=c.files)
        timers.append(t)
        return seconds

    def walk() -> float:
        started = time.perf_counter()
        count = bare_walk(str(c.path))
        seconds = time.perf_counter() - started
        if count != c.files:
            raise RuntimeError(f"walk found {count} files, expected {c.files}")
        return seconds

    run(), walk()  # warm both (page cache, imports, the server's buffers)
    timers.clear()
    t = alternate({"no-change run": run, "scandir+stat": walk}, bench.cheap_repeats)
    ratios = per_round(t["no-change run"], t["scandir+stat"])
    ratio = med(ratios)
    notes = [
        bench.describe(c),
        server_settings(base),
        full_note,
        f"per-round ratios {fmt_rounds(ratios, '×')}; walk found {c.files:,} files",
        f"the run by step (medians of rounds, of {fmt_s(med(t['no-change run']))}): "
        + spent(timers, med(t["no-change run"])),
    ]
    return [
        bench.row(
            "11",
            title,
            measured=f"{fmt_s(med(t['no-change run']))} run",
            baseline=f"{fmt_s(med(t['scandir+stat']))} scandir+stat",
            ratio=f"{ratio:.2f}×",
            goal=GOALS["11"],
            passed=ratio <= 2,
            notes=notes,
        )
    ]


def waits(watches: list[Watch]) -> str:
    samples = sum(w.samples for w in watches)
    kinds: dict[str, int] = defaultdict(int)
    for w in watches:
        for kind, count in w.waits.items():
            kinds[kind] += count
    lock = kinds.get("Lock", 0)
    shares = ", ".join(
        f"{'running' if kind == 'none' else kind} {100 * count / samples:.0f}%"
        for kind, count in sorted(kinds.items(), key=lambda kv: -kv[1])
    )
    return (
        f"{samples} samples: {shares or 'none'}; waiting for a lock (one worker holding up the "
        f"other) in {lock}"
    )


# --- figure 12: worker processes ------------------------------------------------------------------


@contextlib.contextmanager
def fake_llm(delay: list[float]) -> Iterator[dict[str, str]]:
    """The loopback LLM server of the tests, answering every request after `delay[0]`
    seconds with no knowledge items; yields the environment that points a worker at it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.fake_llm import LLM_ENV, PROXY_ENV, FakeLLM, items_answer, slow

    with FakeLLM(api_key="bench-key") as server:
        server.responder = lambda _request: slow(delay[0], items_answer())
        env = {name: "" for name in (*LLM_ENV, *PROXY_ENV)}
        env.update({"ANTHROPIC_API_KEY": "bench-key", "ANTHROPIC_BASE_URL": server.base_url})
        yield env


class Worker:
    """`session-pipeline run …` as a worker process, on a Prefect-less command line; a thread
    waits for it, so each worker's own time is known however they are waited for."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        exe = Path(sys.executable).with_name("session-pipeline")
        run_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        run_env.update(env)
        run_env = {k: v for k, v in run_env.items() if v != ""}
        self.args = args
        self.seconds = 0.0
        self.out = self.err = ""
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(exe), "run", *args, "--json"],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.waiter = threading.Thread(target=self._wait, daemon=True)
        self.waiter.start()

    def _wait(self) -> None:
        try:
            self.out, self.err = self.process.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.out, self.err = self.process.communicate()
        self.seconds = time.perf_counter() - self.started

    def wait(self) -> list[dict[str, Any]]:
        self.waiter.join()
        what = f"session-pipeline run {' '.join(self.args)}"
        if self.process.returncode != 0:
            raise RuntimeError(f"{what} failed: {self.err.strip()[-400:]}")
        if "ran in this process" not in self.err:
            raise RuntimeError(f"{what} was not a run in its own process: {self.err[-300:]}")
        figures = json.loads(self.out)
        return figures if isinstance(figures, list) else [figures]


def _idle_ticks() -> tuple[int, int] | None:
    """The machine's idle and total CPU ticks so far (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return values[3] + values[4], sum(values)


class Watch:
    """What happened around one side of figure 12: the share of the machine's CPU left idle
    (others' work included), the CPU the worker processes used (their own, not the server's),
    and the wait events of their server connections, sampled every 0.1 s (a lock wait is
    one worker holding up the other through the database)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.names: list[str] = []
        self.samples = 0
        self.waits: dict[str, int] = defaultdict(int)
        self.idle = float("nan")
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def add(self, pid: int) -> None:
        self.names.append(f"session-pipeline {socket.gethostname()} pid {pid}"[:63])

    def __enter__(self) -> Watch:
        self._ticks = _idle_ticks()
        self._cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._thread.start()
        return self

    def _sample(self) -> None:
        import psycopg

        with psycopg.connect(self.base, autocommit=True) as con:
            while not self._stop.wait(0.1):
                rows = con.execute(
                    "SELECT coalesce(wait_event_type, 'none') FROM pg_stat_activity "
                    "WHERE application_name = ANY(%s) AND state <> 'idle'",
                    [self.names],
                ).fetchall()
                self.samples += len(rows)
                for (kind,) in rows:
                    self.waits[kind] += 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        ticks = _idle_ticks()
        if ticks is not None and self._ticks is not None and ticks[1] > self._ticks[1]:
            self.idle = (ticks[0] - self._ticks[0]) / (ticks[1] - self._ticks[1])
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = (cpu.ru_utime + cpu.ru_stime) - (self._cpu.ru_utime + self._cpu.ru_stime)


def fig12(bench: Bench, base: str, title: str) -> list[Row]:
    from bench.run import alternate, fmt_rounds, fmt_s, log, med, per_round
    from state.db import connect
    from state.migrations import migrate

    c = throughput_corpus(bench)
    log(f"figure 12: two workers vs one, usage and verification, over {bench.describe(c)}")
    schemas = Schemas(base, "fig12")
    per_run = min(VERIFICATION_PER_RUN, c.files)
    delay = [0.0]
    expected = {"usage": c.files, "verification": per_run}
    seconds: dict[str, list[float]] = defaultdict(list)
    watches: dict[str, list[Watch]] = defaultdict(list)

    def fresh() -> tuple[str, dict[str, str]]:
        """A new schema, migrated (outside the timer: both sides start from the same state)."""
        name, db = schemas.new()
        with connect(db) as con:
            migrate(con)
        return name, {"SESSION_PIPELINE_DB": str(db)}

    def checked(figures: list[dict[str, Any]], names: list[str]) -> None:
        got = [f.get("processor") for f in figures]
        if got != names:
            raise RuntimeError(f"the worker ran {got}, expected {names}")
        for f in figures:
            if f.get("errors") or f.get("processed") != expected[f["processor"]]:
                raise RuntimeError(
                    f"{f['processor']}: processed {f.get('processed')} (expected "
                    f"{expected[f['processor']]}), errors {f.get('errors_detail', [])[:2]}"
                )

    with fake_llm(delay) as llm_env:
        env = {
            **llm_env,
            "SESSION_DATA_DIR": str(c.path),
            # A worker host's own cores: each worker reads with one process here, where two
            # workers share this machine's two cores (and the server's).
            "SESSION_PIPELINE_READ_PROCESSES": "1",
            "SESSION_PROCESSOR_MAX_PER_RUN": str(VERIFICATION_PER_RUN),
        }

        def alone(name: str) -> float:
            schema, db_env = fresh()
            try:
                worker = Worker([name], {**env, **db_env})
                checked(worker.wait(), [name])
                return worker.seconds
            finally:
                schemas.drop(schema)

        # Calibration (and warm-up: page cache, imports): verification's fake LLM latency is
        # set so that its backlog costs what usage's does, the LLM's wait being most of it.
        usage_alone = alone("usage")
        verification_floor = alone("verification")
        delay[0] = max(0.0, (usage_alone - verification_floor) / per_run)
        verification_cost = verification_floor + delay[0] * per_run
        ideal = (usage_alone + verification_cost) / max(usage_alone, verification_cost)
        log(
            f"  usage alone {usage_alone:.1f}s, verification with an instant LLM "
            f"{verification_floor:.1f}s: the LLM answers after {delay[0] * 1000:.0f} ms"
        )

        def one_worker() -> float:
            schema, db_env = fresh()
            try:
                with Watch(base) as watch:
                    worker = Worker(["--all"], {**env, **db_env})
                    watch.add(worker.process.pid)
                    figures = worker.wait()
                watches["one worker"].append(watch)
                checked(figures, ["usage", "verification"])
                for f in figures:
                    seconds[f"one worker: {f['processor']}"].append(f["duration_seconds"])
                return worker.seconds
            finally:
                schemas.drop(schema)

        def two_workers() -> float:
            schema, db_env = fresh()
            try:
                with Watch(base) as watch:
                    started = time.perf_counter()
                    names = ("usage", "verification")
                    workers = [Worker([name], {**env, **db_env}) for name in names]
                    for worker in workers:
                        watch.add(worker.process.pid)
                    for worker in workers:
                        figures = worker.wait()
                        checked(figures, worker.args)
                        seconds[f"two workers: {worker.args[0]}"].append(worker.seconds)
                    elapsed = time.perf_counter() - started
                watches["two workers"].append(watch)
                return elapsed
            finally:
                schemas.drop(schema)

        try:
            t = alternate({"two workers": two_workers, "one worker": one_worker}, bench.repeats)
        finally:
            schemas.close()
    ratios = per_round(t["one worker"], t["two workers"])
    ratio = med(ratios)
    each = ", ".join(f"{k} {med(v):.1f} s" for k, v in sorted(seconds.items()))
    notes = [
        bench.describe(c),
        server_settings(base),
        "one worker: `session-pipeline run --all` (usage, then verification, in one process); "
        "two workers: `session-pipeline run usage` and `session-pipeline run verification` "
        "started at once; both on one new, migrated schema per round, no Prefect server",
        "the pair: usage (CPU: reading) and verification (waiting: on the loopback fake LLM of "
        "tests/fake_llm.py, no knowledge items in its answers), the two processors the "
        f"project ships; verification takes {per_run} sessions a run (the default "
        "SESSION_PROCESSOR_MAX_PER_RUN), one at a time on the command line, and the LLM's "
        f"latency, {delay[0] * 1000:.0f} ms, was set so its backlog costs what usage's does "
        f"(usage alone {usage_alone:.1f} s, verification with an instant LLM "
        f"{verification_floor:.1f} s): the most two workers can gain is then {ideal:.2f}×",
        "each worker reads with one process (`SESSION_PIPELINE_READ_PROCESSES=1`), the one "
        "worker too: workers on different hosts each have their own cores, while here the "
        "two workers share two cores with the PostgreSQL server and the fake LLM",
        f"per-round speed-ups {fmt_rounds(ratios, '×')}; each run's own time (medians): {each}",
        "around each side (medians of rounds): "
        + "; ".join(
            f"{side}: the machine's CPU {100 * med([w.idle for w in ws]):.0f}% idle (every "
            f"process's work counted, others' too), the worker processes used "
            f"{med([w.cpu for w in ws]):.1f} s of CPU (the server's work for them not counted)"
            for side, ws in sorted(watches.items(), reverse=True)
        ),
        "the workers' server connections while the two ran at once, sampled every 0.1 s when "
        "busy: " + waits(watches["two workers"]),
    ]
    return [
        bench.row(
            "12",
            title,
            measured=f"{fmt_s(med(t['two workers']))} two workers",
            baseline=f"{fmt_s(med(t['one worker']))} one worker",
            ratio=f"{ratio:.2f}× faster",
            goal=GOALS["12"],
            passed=ratio >= 1.6,
            notes=notes,
        )
    ]
