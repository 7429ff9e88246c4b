"""Many hosts: the production route of README's "Many hosts" section, end to end.

A real Prefect server on a new PostgreSQL database; a `process` work pool; the deployments
`prefect deploy --all` makes from the repository's prefect.yaml (cadences of seconds); the
automations of prefect-automations.yaml; two "hosts", each a worker and a webhook in
processes of their own, with their own working directory, Prefect home and host name (a UTS
namespace per process, so `processor_runs.host` tells them apart as on real machines),
sharing one state database (`SESSION_PIPELINE_DB`, a new PostgreSQL database) and one data
dir. Verification talks to the loopback fake LLM, which answers from the transcript it is
sent, so its rows depend on the sessions alone.

Phase 1: sessions arrive while both processors run on their cadences and on triggers sent to
both hosts' webhooks. No two runs of a processor overlapped (the ledger, and Prefect's
record), both hosts ran work (the ledger's host is the worker Prefect names), what a dead host
leaves in Prefect is Crashed by the automations, and every output table and view of both
processors equals, row for row, a single-host run of the same corpus on an embedded DuckDB
file. Phase 2: a host dies half way through a verification run (its worker, that run and its
webhook SIGKILLed); `doctor` on the other host clears what it left, the other host reads the
rest, and the tables again equal a clean run.

Needs the PostgreSQL server of the other PostgreSQL tests (`postgres_url` in conftest.py), as
a user that may create databases; skipped without one. About 3 minutes on 2 cores (2:48 to
3:40 measured with other test suites running beside it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import yaml

from tests.conftest import EXAMPLES, ROOT
from tests.fake_llm import LLM_ENV, PROXY_ENV, FakeLLM, Received, Reply, items_answer

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
EXE = str(BIN / "session-pipeline")
POOL = "session-pipeline"  # prefect.yaml's work pool
TOKEN = "many-hosts-token"
HOSTS = ("mh-host-a", "mh-host-b")
# Seconds: the deployments' cadences here. Longer than a run takes to start on a loaded
# machine (10-17 s seen), or every trigger finds a scheduled run going.
USAGE_EVERY, VERIFICATION_EVERY = 25, 30
PROCESSORS = ("usage", "verification")
HEARTBEAT = 30  # seconds between a flow run's heartbeats: Prefect's shortest
# The automations' windows here: no heartbeat for this long, or Pending for this long: Crashed.
CRASHED_AFTER = {
    "session-pipeline-crash-runs-of-dead-hosts": 50,
    "session-pipeline-crash-runs-that-never-start": 60,
}
SOURCES = sorted(EXAMPLES.glob("*/*.jsonl"))
# Columns that differ between two correct runs: how long an LLM call took.
VOLATILE = {"verification_sessions": {"duration_seconds"}}
# Every output table of both processors, and the views over them (the SQL the backend runs).
RELATIONS = (
    "usage_events",
    "usage_requests_raw",
    "usage_sessions_raw",
    "usage_request_copies",
    "usage_requests",
    "usage_sessions",
    "usage_requests_unique",
    "usage_daily",
    "usage_tools",
    "verification_evidence",
    "verification_sessions",
    "knowledge_items",
)
STATE_SQL = (
    "SELECT processor_name, session_file, status, items_extracted, file_hash, size_bytes "
    "FROM session_processor_state"
)


# PostgreSQL ---------------------------------------------------------------------------------


def _on(url: str, database: str, driver: str = "postgresql") -> str:
    """The URL of another database on the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=driver, path=f"/{database}", query=""))


@contextlib.contextmanager
def _database(admin_url: str, prefix: str) -> Iterator[str]:
    """A new PostgreSQL database, dropped afterwards; yields its name."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as con:
        con.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with (
            contextlib.suppress(Exception),
            psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as con,
        ):
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# processes -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


# Runs argv under a host name of its own: a new UTS namespace (root only) whose name is set.
HOSTNAME_SHIM = (
    "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execv(sys.argv[2], sys.argv[2:])"
)


def _uts_namespaces() -> bool:
    """Can we give a process a host name of its own? (Without, the hosts share this one's
    and are told apart by the worker name Prefect records on each run.)"""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--uts", sys.executable, "-c", HOSTNAME_SHIM, "mh-probe", "/bin/true"],
        capture_output=True,
    )
    return probe.returncode == 0


def _env(**extra: str) -> dict[str, str]:
    """The environment every process here starts from: no Prefect settings of the caller's,
    no LLM settings, no proxy in the way of the loopback servers."""
    drop = {*LLM_ENV, *PROXY_ENV}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in drop}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1", **extra)
    return env


def _http(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """Prefect answers 503 for errors worth retrying; so do we, for 30 s."""
    deadline = time.monotonic() + 30
    while True:
        try:
            response = httpx.request(method, url, timeout=30, **kwargs)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def _wait(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
        time.sleep(every)
    return result


@dataclass
class Host:
    """A machine of the cluster: its processes, working directory, environment and name."""

    name: str
    home: Path
    env: dict[str, str]
    uts: bool
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    webhook_url: str = ""

    def spawn(self, role: str, argv: list[str]) -> subprocess.Popen[bytes]:
        if self.uts:
            argv = ["unshare", "--uts", sys.executable, "-c", HOSTNAME_SHIM, self.name, *argv]
        with (self.home / f"{role}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=self.home,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[role] = proc
        return proc

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if self.uts:
            argv = ["unshare", "--uts", sys.executable, "-c", HOSTNAME_SHIM, self.name, *argv]
        return subprocess.run(
            argv, cwd=self.home, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def log(self, role: str) -> str:
        path = self.home / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tree(self) -> list[int]:
        """Every process of this host, its flow runs included."""
        pids = []
        for proc in self.procs.values():
            if proc.poll() is None:
                pids += [proc.pid, *_descendants(proc.pid)]
        return pids

    def die(self) -> list[int]:
        """The host is gone: SIGKILL for every one of its processes, worker first (a worker
        left alive would report its run's end)."""
        pids = self.tree()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        return pids

    def stop(self) -> None:
        """Test clean-up: SIGTERM, then SIGKILL for whatever is left, flow runs included."""
        left = self.tree()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        for pid in left:  # flow runs that outlived their worker
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# the fake LLM's answers ---------------------------------------------------------------------

_FIRST_USER_TURN = re.compile(r"\[turn \d+\] USER[^\n]*\n(.+)")


class Answers:
    """Answers from the transcript sent: the first words of its first user turn, quoted as
    the user's own, so a session's evidence depends on its content alone."""

    def __init__(self) -> None:
        self.delay = 0.0

    def __call__(self, request: Received) -> Reply:
        prompt = request.body["messages"][-1]["content"]
        found = _FIRST_USER_TURN.search(prompt)
        words = found.group(1).split()[:8] if found else []
        if len(words) < 3:
            return items_answer(delay=self.delay)
        quote = " ".join(words)
        item = {
            "detection_type": "unprompted_definition",
            "title": f"Stated: {quote[:60]}",
            "content": f"The user stated: {quote}",
            "user_quote": quote,
            "domain": "engineering",
            "entities": [words[0]],
        }
        return items_answer(item, delay=self.delay)


# the corpus --------------------------------------------------------------------------------


def _make_sessions(staging: Path, start: int, count: int) -> list[Path]:
    """`count` sessions varied from the bundled samples (new ids, users spread over five per
    sample user, subagent transcripts copied along), written under `staging`; returns the
    files, each to be moved into the data dir whole."""
    subagents = {p.parent.parent.name: p.parent for p in EXAMPLES.glob("*/*/subagents/*.jsonl")}
    files = []
    for i in range(start, start + count):
        src = SOURCES[i % len(SOURCES)]
        new = str(uuid.UUID(int=0x3A57 << 64 | i))
        user = staging / f"{src.parent.name}{i % 5}"
        user.mkdir(parents=True, exist_ok=True)
        if src.stem in subagents:
            shutil.copytree(subagents[src.stem], user / new / "subagents")
            files += sorted((user / new / "subagents").glob("*"))
        session = user / f"{new}.jsonl"
        session.write_text(src.read_text().replace(src.stem, new))
        files.append(session)
    return files


def _publish(files: list[Path], staging: Path, data_dir: Path) -> None:
    """Sessions arrive: each file appears whole (a rename), subagents before their session."""
    for path in files:
        target = data_dir / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


# the state ---------------------------------------------------------------------------------


def _normal(value: Any) -> Any:
    """A value as both backends give it back: times in UTC, numbers to 9 digits, JSON
    parsed, sequences as tuples."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    if isinstance(value, float | Decimal):
        number = float(value)
        return number if not math.isfinite(number) else float(f"{number:.9g}")
    if isinstance(value, list | tuple):
        return tuple(_normal(v) for v in value)
    if isinstance(value, dict):
        return json.dumps({k: _normal(v) for k, v in value.items()}, sort_keys=True)
    if isinstance(value, str) and value[:1] in "[{":
        with contextlib.suppress(ValueError):
            return _normal(json.loads(value))
    return value


def _connect(db: str, read_only: bool = True) -> Any:
    from state import config
    from state.db import connect

    return connect(config.db_path(db), read_only=read_only)


def _rows(db: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with _connect(db) as con:
        return con.execute(sql, params or []).fetchall()


def _tables(db: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every output relation of both processors, normalised and sorted, and the state rows."""
    out = {}
    with _connect(db) as con:
        for relation in RELATIONS:
            cursor = con.execute(f"SELECT * FROM {relation}")
            names = [d[0] for d in cursor.description]
            keep = [i for i, n in enumerate(names) if n not in VOLATILE.get(relation, set())]
            rows = [tuple(_normal(row[i]) for i in keep) for row in cursor.fetchall()]
            out[relation] = sorted(rows, key=repr)
        out["state"] = sorted((_normal(r) for r in con.execute(STATE_SQL).fetchall()), key=repr)
    return out


def _clean_run(data_dir: Path, workdir: Path, llm_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """A single-host run of the corpus: both processors in the command's own process (no
    Prefect), on a new embedded DuckDB file, the same fake LLM answering."""
    db = workdir / f"clean-{time.monotonic_ns()}.duckdb"
    env = _env(
        ANTHROPIC_API_KEY="test-key",
        ANTHROPIC_BASE_URL=llm_url,
        SESSION_PROCESSOR_MAX_PER_RUN="0",
        SESSION_PIPELINE_VERIFICATION_TIME_BUDGET="0",
    )
    for processor in ("usage", "verification"):
        done = subprocess.run(
            [EXE, "run", processor, "--json", "--data-dir", str(data_dir), "--db", str(db)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        figures = json.loads(done.stdout)
        assert figures["errors"] == 0 and figures["deferred"] == 0, figures
    return _tables(str(db))


@dataclass(frozen=True)
class Run:
    """A `processor_runs` ledger row."""

    processor: str
    flow_run_id: str | None
    status: str
    host: str | None
    pid: int | None
    started_at: datetime
    finished_at: datetime | None
    processed: int | None


def _ledger(db: str) -> list[Run]:
    rows = _rows(
        db,
        "SELECT processor_name, flow_run_id, status, host, pid, started_at, finished_at, "
        "processed FROM processor_runs ORDER BY started_at",
    )
    return [Run(*row) for row in rows]


def _overlaps(runs: list[Run], ended: dict[str, datetime] | None = None) -> list[tuple[str, str]]:
    """Pairs of runs of one processor whose [start, end) intersect; a run still open ends
    now, or when `ended` says (the moment its host died)."""
    now = datetime.now(UTC)

    def end(run: Run) -> datetime:
        return run.finished_at or (ended or {}).get(str(run.flow_run_id)) or now

    found = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a.processor == b.processor and a.started_at < end(b) and b.started_at < end(a):
                found.append((str(a.flow_run_id), str(b.flow_run_id)))
    return found


# the cluster -------------------------------------------------------------------------------


@dataclass
class Cluster:
    api: str
    db: str
    data_dir: Path
    staging: Path
    workdir: Path
    hosts: dict[str, Host]
    llm: FakeLLM
    answers: Answers
    deployments: dict[str, str]  # processor -> deployment id
    clean_llm: FakeLLM  # the clean runs' own, answering alike without delay
    background: ThreadPoolExecutor
    made: int = 0  # sessions made so far

    def clean_run(self) -> Future[dict[str, list[tuple[Any, ...]]]]:
        """The clean run of the corpus as it is now, started in the background (it needs
        nothing of the cluster, which meanwhile works through the same corpus)."""
        return self.background.submit(
            _clean_run, self.data_dir, self.workdir, self.clean_llm.base_url
        )

    def settle(self, host: Host, dead: Collection[str] = ()) -> None:
        """Trigger both processors through `host` every 2 s until everything is read."""

        def settled() -> bool:
            for processor in PROCESSORS:
                self.trigger(host, processor)
            return self.settled(host, dead)

        try:
            _wait("every session read by both processors", settled, 180, 2)
        except AssertionError:
            states = {i: _history(self, i) for i in dead}
            raise AssertionError(f"dead runs: {states}\n{self.diagnostics()}") from None

    def sessions(self, count: int) -> list[Path]:
        files = _make_sessions(self.staging, self.made, count)
        self.made += count
        return files

    def publish(self, files: list[Path]) -> None:
        _publish(files, self.staging, self.data_dir)

    def trigger(self, host: Host, processor: str) -> int:
        path = (
            f"/processors/{processor}/runs"
            if processor == "usage"
            else f"/api/admin/run-session-processor?processor={processor}"
        )
        try:
            response = httpx.post(
                host.webhook_url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
            )
        except httpx.TransportError:
            return 0
        return response.status_code

    def health(self, host: Host) -> dict[str, dict[str, Any]]:
        response = httpx.get(
            f"{host.webhook_url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        assert response.status_code == 200, response.text
        return {p["processor"]: p for p in response.json()["processors"]}

    def flow_runs(self) -> list[dict[str, Any]]:
        """The flow runs of both deployments that left Scheduled (each has 100 ahead)."""
        found: list[dict[str, Any]] = []
        body: dict[str, Any] = {
            "deployments": {"id": {"any_": list(self.deployments.values())}},
            "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}},
            "limit": 200,
        }
        while True:
            response = _http(
                "POST", f"{self.api}/flow_runs/filter", json=body | {"offset": len(found)}
            )
            assert response.status_code == 200, response.text
            page = list(response.json())
            found += page
            if len(page) < 200:
                return found

    def pause(self, processor: str, paused: bool) -> None:
        """Switch a deployment's schedule off or back on."""
        deployment = self.deployments[processor]
        for schedule in _http("GET", f"{self.api}/deployments/{deployment}").json()["schedules"]:
            done = _http(
                "PATCH",
                f"{self.api}/deployments/{deployment}/schedules/{schedule['id']}",
                json={"active": not paused},
            )
            assert done.status_code == 204, done.text

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return dict(_http("GET", f"{self.api}/flow_runs/{flow_run_id}").json())

    def settled(self, host: Host, dead: Collection[str] = ()) -> bool:
        """Every session read by both processors, and no run going (but the `dead` flow runs,
        whose host died: their ledger rows stay 'running')."""
        try:
            health = self.health(host)
        except (httpx.HTTPError, AssertionError):
            return False
        if any(health[p]["pending"] for p in PROCESSORS):
            return False
        return not [
            r for r in _ledger(self.db) if r.status == "running" and r.flow_run_id not in dead
        ]

    def diagnostics(self) -> str:
        lines = [f"ledger: {r}" for r in _ledger(self.db)[-30:]]
        for host in self.hosts.values():
            for role in host.procs:
                lines.append(f"--- {host.name} {role}:\n{host.log(role)[-2500:]}")
        return "\n".join(lines)


def _start_prefect_server(home: Path, database_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = _env(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=database_url)
    argv = [PREFECT, "server", "start", "--no-ui", "--host", "127.0.0.1", "--port", str(port)]
    with (home / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    api = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        return False

    _wait("healthy Prefect server", healthy, 120, every=0.2)
    return proc, api


def _prefect(env: dict[str, str], *args: str) -> Callable[[], str]:
    """Start a `prefect` command (from the repository root, as an operator deploys); the
    callable returned waits for it and returns its output."""
    log = Path(env["PREFECT_HOME"]) / f"prefect-{args[0]}-{time.monotonic_ns()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PREFECT, "--no-prompt", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )

    def done() -> str:
        code = proc.wait(timeout=180)
        output = log.read_text(errors="replace")
        assert code == 0, f"prefect {' '.join(args)}:\n{output[-3000:]}"
        return output

    return done


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("many-hosts")
    data_dir, staging = workdir / "sessions", workdir / "staging"
    data_dir.mkdir()
    staging.mkdir()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        prefect_db = stack.enter_context(_database(postgres_url, "mh_prefect"))
        db = _on(postgres_url, stack.enter_context(_database(postgres_url, "mh_state")))
        (workdir / "server").mkdir()
        prefect_url = _on(postgres_url, prefect_db, driver="postgresql+asyncpg")
        server, api = _start_prefect_server(workdir / "server", prefect_url)
        marks = [f"server {time.monotonic() - started:.0f} s"]
        stack.callback(_stop, server)
        answers = Answers()
        llm = stack.enter_context(FakeLLM())
        llm.responder = answers
        clean_llm = stack.enter_context(FakeLLM())
        clean_llm.responder = Answers()
        background = stack.enter_context(ThreadPoolExecutor(1))
        common = dict(
            PREFECT_API_URL=api,
            SESSION_PIPELINE_DB=db,
            SESSION_DATA_DIR=str(data_dir),
            ANTHROPIC_API_KEY="test-key",
            ANTHROPIC_BASE_URL=llm.base_url,
            SCHEDULER_USAGE_PROCESSOR_INTERVAL=str(USAGE_EVERY),
            SCHEDULER_VERIFICATION_DETECTOR_INTERVAL=str(VERIFICATION_EVERY),
        )

        # the operator's part: the pool, then the deployments (from prefect.yaml) and the
        # automation (from prefect-automations.yaml) while the hosts start
        admin = _env(PREFECT_HOME=str(workdir / "admin"), PWD=str(ROOT), **common)
        _prefect(admin, "work-pool", "create", POOL, "--type", "process")()
        marks.append(f"pool {time.monotonic() - started:.0f} s")
        deployed = _prefect(admin, "deploy", "--all")
        automation = yaml.safe_load((ROOT / "prefect-automations.yaml").read_text())
        for item in automation["automations"]:  # shorter than in production: a test's time
            item["trigger"]["within"] = CRASHED_AFTER[item["name"]]
        automated = _prefect(admin, "automation", "create", "--from-json", json.dumps(automation))

        # the hosts: a worker and a webhook each
        uts = _uts_namespaces()
        hosts: dict[str, Host] = {}
        for name in HOSTS:
            home = workdir / name
            home.mkdir()
            env = _env(
                PREFECT_HOME=str(home / "prefect"),
                PREFECT_WORKER_QUERY_SECONDS="1",
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT),
                SESSION_PIPELINE_WEBHOOK_TOKEN=TOKEN,
                SESSION_PIPELINE_COMMIT_SECONDS="1",
                SESSION_PROCESSOR_MAX_PER_RUN="20",
                **common,
            )
            host = hosts[name] = Host(name, home, env, uts)
            stack.callback(host.stop)
            host.spawn("worker", [PREFECT, "worker", "start", "--pool", POOL, "--name", name])
            port = _free_port()
            host.webhook_url = f"http://127.0.0.1:{port}"
            host.spawn("webhook", [EXE, "webhook", "--port", str(port)])
        deployed()
        automated()
        marks.append(f"deployed {time.monotonic() - started:.0f} s")
        deployments = {}
        for processor in PROCESSORS:
            found = _http("GET", f"{api}/deployments/name/{processor}-processor/{processor}")
            assert found.status_code == 200, found.text
            deployments[processor] = found.json()["id"]
        for host in hosts.values():
            _wait(f"webhook of {host.name}", lambda h=host: _answers(h), 60)
            _wait(f"worker {host.name}", lambda h=host: _online(api, h.name), 60)
        marks.append(f"hosts {time.monotonic() - started:.0f} s")
        print(f"cluster up: {', '.join(marks)} (UTS namespaces: {uts})")
        yield Cluster(
            api,
            db,
            data_dir,
            staging,
            workdir,
            hosts,
            llm,
            answers,
            deployments,
            clean_llm,
            background,
        )


def _answers(host: Host) -> bool:
    for role, proc in host.procs.items():
        assert proc.poll() is None, f"{host.name} {role} exited:\n{host.log(role)[-3000:]}"
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{host.webhook_url}/processors", timeout=2).status_code in (200, 401)
    return False


def _online(api: str, worker: str) -> bool:
    response = _http("POST", f"{api}/work_pools/{POOL}/workers/filter", json={})
    return any(w["name"] == worker and w["status"] == "ONLINE" for w in response.json())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _leave_zombies(api: str) -> dict[str, str]:
    """What a host that died leaves in Prefect, made through the API: a flow run Running
    whose heartbeats stopped (after one), and one Pending that never started; tagged as our
    deployments tag their runs, of a flow of their own (so no deployment slot is taken)."""
    import asyncio

    from prefect.events.clients import PrefectEventsClient
    from prefect.events.schemas.events import Event

    flow = _http("POST", f"{api}/flows/", json={"name": "mh-dead-host"}).json()
    made = {}
    for state in ("PENDING", "RUNNING"):
        run = _http(
            "POST",
            f"{api}/flow_runs/",
            json={
                "flow_id": flow["id"],
                "name": f"mh-dead-{state.lower()}",
                "tags": ["session-pipeline"],
                "state": {"type": "SCHEDULED"},
            },
        ).json()
        for step in ("PENDING", "RUNNING")[: 1 + (state == "RUNNING")]:
            moved = _http(
                "POST", f"{api}/flow_runs/{run['id']}/set_state", json={"state": {"type": step}}
            )
            assert moved.json()["status"] == "ACCEPT", moved.text
        made[state] = run["id"]

    async def heartbeat() -> None:
        async with PrefectEventsClient(api_url=api) as client:
            await client.emit(
                Event(
                    event="prefect.flow-run.heartbeat",
                    resource={"prefect.resource.id": f"prefect.flow-run.{made['RUNNING']}"},
                    related=[
                        {
                            "prefect.resource.id": "prefect.tag.session-pipeline",
                            "prefect.resource.role": "tag",
                        }
                    ],
                )
            )

    asyncio.run(heartbeat())
    return made


# the tests ---------------------------------------------------------------------------------


def _kind(run: dict[str, Any]) -> str:
    if "trigger:webhook" in run["tags"]:
        return "webhook"
    return "scheduled" if run["auto_scheduled"] else "other"


def _assert_prefect_runs_never_overlapped(cluster: Cluster) -> None:
    """Runs of one deployment were Running one at a time, as Prefect recorded them."""
    spans: dict[str, list[tuple[str, str, str]]] = {}
    for run in cluster.flow_runs():
        if run["run_count"] and run["start_time"]:  # it ran (a cancelled one has a start)
            end = run["end_time"] or "9999"
            spans.setdefault(run["deployment_id"], []).append((run["start_time"], end, run["id"]))
    for found in spans.values():
        found.sort()
        for (_, end, one), (start, _, other) in pairwise(found):
            assert end <= start, (
                f"flow runs {one} and {other} overlapped in Prefect: "
                f"{_history(cluster, one)} / {_history(cluster, other)}"
            )


def _history(cluster: Cluster, flow_run_id: str) -> list[tuple[str, str, str]]:
    states = _http("GET", f"{cluster.api}/flow_run_states/", params={"flow_run_id": flow_run_id})
    return [(s["timestamp"], s["name"], s.get("message") or "") for s in states.json()]


def _missing(cluster: Cluster, since: datetime) -> list[str]:
    """What phase 1 has yet to see: each processor's completed runs from its schedule and
    from the webhook, and completed runs on both hosts, started `since` the first sessions
    arrived (not the runs that found an empty data dir)."""
    done = [r for r in _ledger(cluster.db) if r.status == "completed" and r.started_at >= since]
    runs = {r["id"]: r for r in cluster.flow_runs()}
    gaps = []
    for processor in PROCESSORS:
        kinds = {
            _kind(runs[r.flow_run_id])
            for r in done
            if r.processor == processor and r.flow_run_id in runs
        }
        gaps += [
            f"a {kind} {processor} run" for kind in ("scheduled", "webhook") if kind not in kinds
        ]
    workers = {
        runs[r.flow_run_id]["labels"].get("prefect.worker.name")
        for r in done
        if r.flow_run_id in runs
    }
    return gaps + [f"a run on {host}" for host in HOSTS if host not in workers]


def test_two_hosts_share_the_work_and_match_a_single_host_run(cluster: Cluster) -> None:
    """Sessions arrive in three waves 6 s apart while each processor runs on its cadence and
    on triggers sent to both hosts' webhooks every second or so; then until each processor
    has completed runs of both kinds and both hosts have worked (at most 240 s)."""
    started = time.monotonic()
    zombies = _leave_zombies(cluster.api)
    hosts = list(cluster.hosts.values())
    codes: dict[tuple[str, int], int] = {}
    waves = [cluster.sessions(16) for _ in range(3)]
    next_wave, i, missing = time.monotonic(), 0, ["the arrivals"]
    closed: dict[str, float] = {}  # what was seen when
    while missing:
        assert time.monotonic() - started < 240, (missing, codes, cluster.diagnostics())
        if waves and time.monotonic() >= next_wave:
            if len(waves) == 3:
                first_arrival = datetime.now(UTC)
            cluster.publish(waves.pop(0))
            next_wave += 6
            if not waves:
                clean = cluster.clean_run()
        if not waves:
            was, missing = missing, _missing(cluster, first_arrival)
            closed.update({gap: time.monotonic() - started for gap in was if gap not in missing})
        for processor in PROCESSORS:
            if waves or f"a webhook {processor} run" in missing:  # (leave room for the cadence)
                code = cluster.trigger(hosts[i % 2], processor)
                codes[processor, code] = codes.get((processor, code), 0) + 1
                i += 1
        time.sleep(1.0)
    marks = [f"{gap} {at:.0f} s" for gap, at in sorted(closed.items(), key=lambda c: c[1])]
    cluster.settle(hosts[0])
    marks.append(f"settled {time.monotonic() - started:.0f} s")

    ledger = _ledger(cluster.db)
    runs = {r["id"]: r for r in cluster.flow_runs()}
    done = [r for r in ledger if r.status == "completed"]
    assert _overlaps(ledger) == [], cluster.diagnostics()
    _assert_prefect_runs_never_overlapped(cluster)
    assert {c for (_, c) in codes} <= {202, 409}, codes
    # Prefect's record of which worker ran each run agrees with the ledger's host name
    for r in done:
        worker = runs[str(r.flow_run_id)]["labels"].get("prefect.worker.name")
        assert worker in HOSTS, runs[str(r.flow_run_id)]["labels"]
        assert r.host == worker or not hosts[0].uts, (r, worker)

    # what a dead host leaves (a run Running without heartbeats, one Pending that never
    # started) is Crashed by the automations of prefect-automations.yaml
    for state, flow_run_id in zombies.items():
        crashed = _wait(
            f"the {state.lower()} zombie crashed",
            lambda i=flow_run_id: cluster.flow_run(i)["state_type"] == "CRASHED",
            max(CRASHED_AFTER.values()) + 30,
        )
        assert crashed, state

    shared = _tables(cluster.db)
    assert shared["verification_evidence"] and shared["usage_events"]
    for relation, rows in clean.result(timeout=180).items():
        assert shared[relation] == rows, relation
    workers = [runs[str(r.flow_run_id)]["labels"]["prefect.worker.name"] for r in done]
    per_host = {h: workers.count(h) for h in HOSTS}
    marks.append(f"compared {time.monotonic() - started:.0f} s")
    print(
        f"phase 1: {len(done)} completed runs {per_host}, triggers {codes}, "
        f"{len(shared['state'])} state rows; {', '.join(marks)}"
    )


def test_a_host_that_dies_mid_run_is_recovered_from_by_the_other(cluster: Cluster) -> None:
    """New sessions; a host dies half way through the verification run reading them (its
    worker, that run and its webhook SIGKILLed); `doctor` on the other host clears what the
    dead one left, and the other host's runs read everything again.

    The usage schedule is paused until the kill, so the dead host takes no usage run that is
    only starting with it: such a run (Pending, no ledger row) is Crashed by the automation
    only after Prefect holds its state events for 15 minutes (an auto-scheduled run's first
    state event follows one that was never sent), and its deployment slot stays taken for
    the 300 s of Prefect's lease; README says so."""
    started = time.monotonic()
    cluster.pause("usage", True)
    _wait(
        "no usage run going",
        lambda: (
            not [
                r
                for r in cluster.flow_runs()
                if r["deployment_id"] == cluster.deployments["usage"]
                and r["state_type"] in ("PENDING", "RUNNING")
            ]
        ),
        120,
        1,
    )
    cluster.answers.delay = 2.0  # such a run takes ~10 s: room to die in
    before = {r.flow_run_id for r in _ledger(cluster.db)}
    cluster.publish(cluster.sessions(16))  # 19 files with subagents: a run reads them all
    clean = cluster.clean_run()
    committed = "SELECT count(*) FROM session_processor_state WHERE processor_name = 'verification'"
    (baseline,) = _rows(cluster.db, committed)[0]

    def victim_run() -> Run | None:
        for run in _ledger(cluster.db):
            if (
                run.processor == "verification"
                and run.status == "running"
                and run.flow_run_id not in before
                and _rows(cluster.db, committed)[0][0] >= baseline + 4
            ):
                return run
        return None

    hosts = list(cluster.hosts.values())
    deadline, i = time.monotonic() + 90, 0
    while (run := victim_run()) is None:
        assert time.monotonic() < deadline, cluster.diagnostics()
        if i % 10 == 0:  # a trigger every 2 s, to either host, as the cadence goes on
            cluster.trigger(hosts[i // 10 % 2], "verification")
        i += 1
        time.sleep(0.2)
    victim = cluster.hosts[str(run.host)] if cluster.hosts[HOSTS[0]].uts else None
    if victim is None:  # no host names: find the worker by Prefect's label
        label = cluster.flow_run(str(run.flow_run_id))["labels"]["prefect.worker.name"]
        victim = cluster.hosts[label]
    survivor = next(h for h in cluster.hosts.values() if h is not victim)
    tree = victim.tree()
    assert run.pid in tree, (run.pid, tree)  # the ledger's pid is the dead host's flow run
    killed_at = datetime.now(UTC)
    killed = time.monotonic()
    victim.die()
    marks = [f"killed {killed - started:.0f} s"]
    # what the host took with it: the runs its worker had claimed that had not ended (the
    # verification run, and any other starting or running there)
    dead = {
        r["id"]: r["name"]
        for r in cluster.flow_runs()
        if r["labels"].get("prefect.worker.name") == victim.name
        and r["state_type"] in ("PENDING", "RUNNING")
    }
    assert str(run.flow_run_id) in dead, dead

    # An operator (or a timer) runs doctor on the host that is left: with the state in
    # PostgreSQL it tells the dead host's run is gone (its processor's advisory lock went with
    # its connection), marks it Crashed (freeing its deployment slot), releases the lease it
    # held its processor's slot with (no 60 s wait) and closes its ledger row.
    doctor = survivor.run([EXE, "doctor"])
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    said = doctor.stdout
    assert re.search(r"zombie run \S+ \(verification, running\): .*; marked Crashed", said), said
    if time.monotonic() - killed < 40:  # its lease (60 s, renewed every 15 s) had not expired
        assert "leaked slot: session-pipeline-verification" in said, said
    closed = {r.flow_run_id: r.status for r in _ledger(cluster.db) if r.flow_run_id in dead}
    assert closed[run.flow_run_id] == "crashed", (closed, said)
    limit = _http("GET", f"{cluster.api}/v2/concurrency_limits/session-pipeline-verification")
    assert limit.json()["active_slots"] == 0, (limit.text, said)
    marks.append(f"doctor {time.monotonic() - started:.0f} s")

    # the survivor carries on: its scheduled runs, and triggers sent to its webhook
    cluster.pause("usage", False)
    cluster.settle(survivor, dead=set(dead))
    assert {cluster.flow_run(i)["state_type"] for i in dead} == {"CRASHED"}, dead
    recovery = time.monotonic() - killed
    marks.append(f"recovered {time.monotonic() - started:.0f} s")
    ledger = _ledger(cluster.db)
    after = [r for r in ledger if r.processor == "verification" and r.started_at > killed_at]
    first = next(r for r in after if r.status == "completed")
    assert first.host == survivor.name or not survivor.uts, first
    ended = dict.fromkeys(dead, killed_at)
    assert _overlaps(ledger, ended=ended) == [], cluster.diagnostics()
    _assert_prefect_runs_never_overlapped(cluster)
    shared = _tables(cluster.db)
    for relation, rows in clean.result(timeout=180).items():
        assert shared[relation] == rows, relation
    marks.append(f"compared {time.monotonic() - started:.0f} s")
    print(
        f"phase 2: killed {victim.name} running {sorted(dead.values())}; doctor on "
        f"{survivor.name} crashed it; every session read on {survivor.name} "
        f"{recovery:.1f} s after the kill; {', '.join(marks)}"
    )
