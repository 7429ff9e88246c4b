"""`serve` as users run it: a real supervisor process starting a real Prefect server, the
runner and the webhook; a run triggered over the REST API; shutdown leaving no process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.cadence import ANCHOR
from flows.doctor import process_alive
from flows.prefect_target import local_serve_api_url, serve_file
from flows.serve import port_in_use
from state.db import connect
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.e2e
READY = "press Ctrl-C"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below `root`, from /proc."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in found:
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                found[child] = cmd.decode(errors="replace").strip()
                frontier.append(child)
    return found


def _wait_until_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if process_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


class Serve:
    """A `python -m flows.serve` process with its own Prefect home, ports and log."""

    def __init__(
        self, home: Path, data_dir: Path, db: Path, ui_port: int, webhook_port: int
    ) -> None:
        self.ui = f"http://127.0.0.1:{ui_port}"
        self.api = f"{self.ui}/api"
        self.webhook = f"http://127.0.0.1:{webhook_port}"
        self.log = home / f"serve-{time.monotonic_ns()}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env["PREFECT_HOME"] = str(home / "prefect")
        self.argv = [sys.executable, "-m", "flows.serve", "--data-dir", str(data_dir)]
        self.argv += [
            "--db",
            str(db),
            "--ui-port",
            str(ui_port),
            "--webhook-port",
            str(webhook_port),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, str] = {}

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.proc

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, (
                f"serve exited {self.proc.returncode}:\n{self.output()[-3000:]}"
            )
            assert time.monotonic() < deadline, (
                f"no {text!r} after {timeout}s:\n{self.output()[-3000:]}"
            )
            self.seen.update(_descendants(self.proc.pid))
            time.sleep(0.2)
        self.seen.update(_descendants(self.proc.pid))

    def kill_everything(self) -> None:
        """Test clean-up only: whatever is still alive, with its process group."""
        for pid in [*([self.proc.pid] if self.proc else []), *self.seen]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Prefect home for the module: its server database is created once (~12 s)."""
    return tmp_path_factory.mktemp("serve")


@pytest.fixture
def serve(home: Path, tmp_path: Path) -> Iterator[Serve]:
    data_dir = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    served = Serve(
        home, data_dir, tmp_path / "state" / "pipeline.duckdb", _free_port(), _free_port()
    )
    try:
        yield served
    finally:
        served.kill_everything()


def _call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """Prefect answers 503 for errors worth retrying (SQLite busy while its scheduler inserts
    the new deployment's runs); its own client retries them, and so does this test."""
    deadline = time.monotonic() + 30
    while True:
        response = httpx.request(method, url, timeout=30, **kwargs)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def _run_to_the_end(api: str, deployment_id: str) -> dict[str, Any]:
    run = _call("POST", f"{api}/deployments/{deployment_id}/create_flow_run", json={"tags": ["x"]})
    assert run.status_code == 201, run.text
    deadline = time.monotonic() + 90
    while True:
        current = _call("GET", f"{api}/flow_runs/{run.json()['id']}").json()
        if current["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return current
        assert time.monotonic() < deadline, f"run still {current['state_type']} after 90 s"
        time.sleep(0.2)


def test_serve_runs_everything_and_stops_cleanly(serve: Serve, tmp_path: Path) -> None:
    # the server's port from Prefect's own variable (no --ui-port), not the default 4200
    at = serve.argv.index("--ui-port")
    serve.env["PREFECT_SERVER_API_PORT"] = serve.argv[at + 1]
    del serve.argv[at : at + 2]
    started = time.monotonic()
    proc = serve.start()
    serve.wait_for(READY)
    ready_after = time.monotonic() - started

    children = _descendants(proc.pid)
    commands = sorted(
        cmd.split(" -m ", 1)[1].split()[0] for cmd in children.values() if " -m " in cmd
    )
    assert commands == ["flows.runner", "flows.webhook", "prefect"], children
    out = serve.output()
    assert f"Prefect UI   {serve.ui}" in out and f"webhook      {serve.webhook}" in out
    assert "usage        every 10 min  (deployment usage-processor/usage)" in out
    assert "doctor: no zombie runs, no leaked concurrency slots" in out

    assert _call("GET", f"{serve.api}/health").json() is True
    assert "<html" in httpx.get(serve.ui, timeout=10).text.lower()  # the UI, served offline
    # the UI calls this server's API, not 127.0.0.1:4200's
    assert _call("GET", f"{serve.ui}/ui-settings").json()["api_url"] == serve.api

    # doctor finds this serve without PREFECT_API_URL, from the file beside the state db
    db = tmp_path / "state" / "pipeline.duckdb"
    assert local_serve_api_url(db) == serve.api
    exe = str(Path(sys.executable).with_name("session-pipeline"))
    no_url = {k: v for k, v in serve.env.items() if k != "PREFECT_API_URL"}
    doctored = subprocess.run(
        [exe, "doctor", "--report-only", "--db", str(db)],
        env=no_url,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert doctored.returncode == 0, doctored.stderr
    assert doctored.stdout == "no zombie runs, no leaked concurrency slots\n"
    deployment = _call("GET", f"{serve.api}/deployments/name/usage-processor/usage").json()
    assert deployment["entrypoint"] == "flows/processor_flow.py:usage_processor"
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert deployment["tags"] == ["session-pipeline", "processor:usage"]
    assert deployment["parameters"] == {
        "data_dir": str(tmp_path / "sessions"),
        "db": str(tmp_path / "state" / "pipeline.duckdb"),
    }
    assert not deployment["paused"]
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["interval"] == 600
    assert datetime.fromisoformat(schedule["schedule"]["anchor_date"]) == ANCHOR
    limit = _call("GET", f"{serve.api}/v2/concurrency_limits/session-pipeline-usage").json()
    assert limit["limit"] == 1 and limit["active_slots"] == 0

    # Not in the seconds before a 10-minute mark: the runner would pick up the scheduled run
    # there too, and the deployment's CANCEL_NEW cancel one of the two.
    while time.time() % 600 > 580 or time.time() % 600 < 5:
        time.sleep(0.5)
    triggered = time.monotonic()
    run = _run_to_the_end(serve.api, deployment["id"])
    run_seconds = time.monotonic() - triggered
    assert run["state_type"] == "COMPLETED", run["state"]
    with connect(tmp_path / "state" / "pipeline.duckdb", read_only=True) as con:
        runs = con.execute(
            "SELECT flow_run_id, status, processed, errors FROM processor_runs "
            "WHERE processor_name = 'usage'"
        ).fetchall()
        assert con.execute("SELECT count(*) FROM usage_sessions").fetchall() == [(7,)]
    # The triggered run read the 7 sessions, unless a 10-minute mark passed while serve was
    # starting (a busy machine): then the scheduled run read them first.
    triggered_run = [r[1:] for r in runs if r[0] == run["id"]]
    scheduled = [r[1:] for r in runs if r[0] != run["id"]]
    assert (triggered_run, scheduled) in (
        ([("completed", 7, 0)], []),
        ([("completed", 0, 0)], [("completed", 7, 0)]),
    ), runs

    assert httpx.get(f"{serve.webhook}/health", timeout=30).status_code == 200
    listing = httpx.get(f"{serve.webhook}/processors", timeout=30).json()
    assert [(p["name"], p["cadence_seconds"]) for p in listing] == [
        ("usage", 600),
        ("verification", 900),
    ]

    # A second serve on the same ports refuses in one line and touches nothing.
    second = subprocess.run(serve.argv, env=serve.env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    port = serve.ui.rsplit(":", 1)[1]
    assert second.stderr == (
        f"session-pipeline: error: port {port} on 127.0.0.1 is in use "
        "(is another session-pipeline serve running?)\n"
    )
    assert second.stdout == ""

    seen = {**serve.seen, **_descendants(proc.pid)}
    stopping = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, serve.output()[-3000:]
    stop_seconds = time.monotonic() - stopping
    assert _wait_until_gone([proc.pid, *seen]) == [], seen
    assert "SIGTERM received, stopping" in serve.output()
    assert local_serve_api_url(db) is None and not serve_file(db).exists()
    assert not port_in_use("127.0.0.1", int(port))
    assert not port_in_use("127.0.0.1", int(serve.webhook.rsplit(":", 1)[1]))
    print(f"ready {ready_after:.1f}s, triggered run {run_seconds:.1f}s, stop {stop_seconds:.1f}s")


def test_a_child_that_dies_stops_the_others(serve: Serve) -> None:
    proc = serve.start()
    serve.wait_for(READY)
    children = _descendants(proc.pid)
    (runner,) = [pid for pid, cmd in children.items() if "flows.runner" in cmd]
    os.kill(runner, signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    assert _wait_until_gone([proc.pid, *children]) == [], children
    errors = [line for line in serve.output().splitlines() if "error:" in line]
    assert errors == [
        "session-pipeline: error: the runner exited unexpectedly (exit code -9); stopping"
    ]


def test_ctrl_c_during_start_up_stops_what_was_started(serve: Serve) -> None:
    proc = serve.start()
    serve.wait_for("starting the Prefect server")
    deadline = time.monotonic() + 30
    while not any(" prefect server" in cmd for cmd in _descendants(proc.pid).values()):
        assert time.monotonic() < deadline, serve.output()
        time.sleep(0.05)
    serve.seen.update(_descendants(proc.pid))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, serve.output()[-3000:]
    assert _wait_until_gone([proc.pid, *serve.seen]) == [], serve.seen
    assert "SIGINT received, stopping" in serve.output()


def test_after_a_crash_the_next_serve_clears_the_zombie(
    serve: Serve, test_plugins: Path, tmp_path: Path
) -> None:
    """The machine dies mid-run (every process SIGKILLed at once): Prefect keeps the run
    Running with both its slots taken. The next serve's doctor crashes it and frees them,
    and the processor runs again at once."""
    serve.env.update(PYTHONPATH=os.environ["PYTHONPATH"], SP_TEST_SLEEP="600")
    proc = serve.start()
    serve.wait_for(READY)
    linecount = _call("GET", f"{serve.api}/deployments/name/linecount-processor/linecount").json()
    doomed = _call(
        "POST", f"{serve.api}/deployments/{linecount['id']}/create_flow_run", json={}
    ).json()
    db = tmp_path / "state" / "pipeline.duckdb"
    deadline = time.monotonic() + 60
    while True:
        with connect(db, read_only=True) as con:
            rows = con.execute(
                "SELECT status FROM processor_runs WHERE flow_run_id = ?", [doomed["id"]]
            ).fetchall()
        if rows == [("running",)]:
            break
        assert time.monotonic() < deadline, serve.output()[-3000:]
        time.sleep(0.2)
    tree = _descendants(proc.pid)
    for pid in [*tree, proc.pid]:  # children first: none of them gets to clean up
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _wait_until_gone(list(tree)) == []

    serve.env["SP_TEST_SLEEP"] = "0"
    proc = serve.start()
    serve.wait_for(READY)
    out = serve.output()
    assert "doctor: zombie run linecount-" in out and "is gone; marked Crashed" in out
    assert (
        "doctor: leaked slot: session-pipeline-linecount has 1 active slot(s) held by dead run "
        "linecount-" in out
    )
    assert "; released its lease" in out
    assert _call("GET", f"{serve.api}/flow_runs/{doomed['id']}").json()["state_type"] == "CRASHED"
    run = _run_to_the_end(serve.api, linecount["id"])
    assert run["state_type"] == "COMPLETED", run["state"]
    with connect(db, read_only=True) as con:
        assert con.execute(
            "SELECT flow_run_id, status, processed FROM processor_runs ORDER BY started_at"
        ).fetchall() == [(doomed["id"], "crashed", None), (run["id"], "completed", 7)]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert _wait_until_gone([proc.pid, *serve.seen]) == []


def test_scheduled_and_webhook_runs_never_overlap(serve: Serve, tmp_path: Path) -> None:
    """linecount every 4 s and webhook triggers every second, while new sessions keep
    arriving: every run is serialised, as the ledger's start and end times prove, and runs
    that come due while one is going are cancelled rather than piling up."""
    from tests.conftest import PLUGINS, user_line, write_session

    data_dir, db = tmp_path / "sessions", tmp_path / "state" / "pipeline.duckdb"
    serve.env.update(
        PYTHONPATH=os.pathsep.join([str(PLUGINS), *sys.path]),
        SESSION_PIPELINE_LINECOUNT_INTERVAL="4",
        SP_TEST_SLEEP="0.3",
        SESSION_PIPELINE_WEBHOOK_TOKEN="tok",
    )
    serve.start()
    serve.wait_for(READY)
    hook = httpx.Client(
        base_url=serve.webhook, headers={"Authorization": "Bearer tok"}, timeout=120
    )
    # the old synchronous form: waits for the run and answers its figures
    deadline = time.monotonic() + 90
    while True:
        waited = hook.post("/api/admin/run-session-processor?processor=linecount&wait=true")
        if waited.status_code != 409:
            break
        assert time.monotonic() < deadline, waited.text
        time.sleep(0.5)
    assert waited.status_code == 200, waited.text
    body = waited.json()
    assert body["ok"] is True and body["details"]["processor"] == "linecount"
    assert set(body["details"]) >= {"scanned", "processed", "skipped", "errors", "items_extracted"}

    codes: list[int] = []
    end = time.monotonic() + 12
    i = 0
    # (12 s, or longer until a trigger found no run going: on a loaded machine the scheduled
    # runs can follow each other without a gap for a while)
    while time.monotonic() < end or (202 not in codes and time.monotonic() < end + 30):
        write_session(data_dir, f"dave/new-{i}.jsonl", [user_line(f"message {i}")])
        if i % 2 == 0:
            codes.append(hook.post("/processors/linecount/runs").status_code)
        i += 1
        time.sleep(0.5)
    assert set(codes) <= {202, 409} and 202 in codes and 409 in codes, codes

    def kinds_of_completed_runs() -> set[str]:
        with connect(db) as con:
            ids = con.execute(
                "SELECT flow_run_id FROM processor_runs "
                "WHERE processor_name = 'linecount' AND status = 'completed'"
            ).fetchall()
        kinds = set()
        for (flow_run_id,) in ids:
            run = _call("GET", f"{serve.api}/flow_runs/{flow_run_id}").json()
            tags, scheduled = run["tags"], run["auto_scheduled"]
            kinds.add("webhook" if "trigger:webhook" in tags else "scheduled" if scheduled else "?")
        return kinds

    deadline = time.monotonic() + 120
    while not {"webhook", "scheduled"} <= (kinds := kinds_of_completed_runs()):
        assert time.monotonic() < deadline, kinds
        time.sleep(1)
    with connect(db) as con:  # every run so far, finished or not, pairwise
        overlapping = con.execute(
            "SELECT a.flow_run_id, b.flow_run_id FROM processor_runs a JOIN processor_runs b "
            "ON a.processor_name = b.processor_name AND a.run_id < b.run_id "
            "AND a.started_at < coalesce(b.finished_at, now()) "
            "AND b.started_at < coalesce(a.finished_at, now()) "
            "WHERE a.processor_name = 'linecount'"
        ).fetchall()
        count = con.execute(
            "SELECT count(*) FROM processor_runs WHERE processor_name = 'linecount'"
        ).fetchone()
    assert overlapping == []
    assert count is not None and count[0] >= 2
    # no backlog: a run that came due while another was going was cancelled, never queued
    runs = _call("POST", f"{serve.api}/flow_runs/filter", json={"limit": 200}).json()
    assert not [r for r in runs if r["state_name"] == "AwaitingConcurrencySlot"], runs


def _ledger(db: Path, flow_run_id: str) -> list[tuple[Any, ...]]:
    try:
        with connect(db, read_only=True) as con:
            return con.execute(
                "SELECT status, pid FROM processor_runs WHERE flow_run_id = ?", [flow_run_id]
            ).fetchall()
    except Exception:  # not created yet, or briefly locked by the run
        return []


def _wait_running(serve: Serve, db: Path, flow_run_id: str) -> int:
    """The pid of the run's process once its ledger row says running."""
    deadline = time.monotonic() + 90
    while not (rows := _ledger(db, flow_run_id)) or rows[0][0] != "running":
        assert time.monotonic() < deadline, serve.output()[-3000:]
        time.sleep(0.2)
    return int(rows[0][1])


def test_a_run_killed_under_serve_frees_its_slot_at_once(
    serve: Serve, test_plugins: Path, tmp_path: Path
) -> None:
    """The run's process is killed (an OOM kill): the runner marks it Crashed and its crash
    hook releases the run's slot there and then, so the next trigger runs, not 'already
    running' for the lease's lifetime."""
    db = tmp_path / "state" / "pipeline.duckdb"
    serve.env.update(
        PYTHONPATH=os.environ["PYTHONPATH"], SP_TEST_SLEEP="600", SESSION_PIPELINE_WEBHOOK_TOKEN="t"
    )
    serve.env["PREFECT_HOME"] = str(tmp_path / "prefect")  # no runs left by other tests
    serve.start()
    serve.wait_for(READY)
    hook = httpx.Client(base_url=serve.webhook, headers={"Authorization": "Bearer t"}, timeout=60)
    first = hook.post("/processors/linecount/runs")
    assert first.status_code == 202, first.text
    accepted = first.json()
    pid = _wait_running(serve, db, accepted["flow_run_id"])
    run = _call("GET", f"{serve.api}/flow_runs/{accepted['flow_run_id']}").json()
    assert run["name"] == accepted["flow_run_name"]  # not renamed when it started

    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    limit = f"{serve.api}/v2/concurrency_limits/session-pipeline-linecount"
    while (state := _call("GET", f"{serve.api}/flow_runs/{run['id']}").json()["state_type"]) != (
        "CRASHED"
    ) or _call("GET", limit).json()["active_slots"] != 0:
        assert time.monotonic() - killed < 45, (state, serve.output()[-3000:])
        time.sleep(0.2)
    assert _ledger(db, run["id"])[0][0] == "crashed"

    second = hook.post("/processors/linecount/runs")
    assert second.status_code == 202, second.text
    again = second.json()["flow_run_id"]
    pid = _wait_running(serve, db, again)  # it took the slot: not refused
    assert time.monotonic() - killed < 58  # before the dead run's 60 s lease could expire
    # leave the module's Prefect server without a run holding the deployment's slot
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 45
    while _call("GET", f"{serve.api}/flow_runs/{again}").json()["state_type"] != "CRASHED":
        assert time.monotonic() < deadline, serve.output()[-3000:]
        time.sleep(0.2)


def test_stopping_serve_during_a_run_cancels_it_after_its_last_commit(
    serve: Serve, test_plugins: Path, tmp_path: Path
) -> None:
    db = tmp_path / "state" / "pipeline.duckdb"
    serve.env.update(PYTHONPATH=os.environ["PYTHONPATH"], SP_TEST_SLEEP="1")
    serve.env["PREFECT_HOME"] = str(tmp_path / "prefect")  # no runs left by other tests
    proc = serve.start()
    serve.wait_for(READY)
    linecount = _call("GET", f"{serve.api}/deployments/name/linecount-processor/linecount").json()
    run = _call("POST", f"{serve.api}/deployments/{linecount['id']}/create_flow_run", json={})
    flow_run_id = run.json()["id"]
    _wait_running(serve, db, flow_run_id)
    time.sleep(2.5)  # a few sessions read (1 s each), more to go
    proc.send_signal(signal.SIGTERM)
    states = []
    while proc.poll() is None:  # the server stops last: watch the run's state until then
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            got = httpx.get(f"{serve.api}/flow_runs/{flow_run_id}", timeout=2).json()
            states.append(got["state_type"])
        time.sleep(0.1)
    assert proc.returncode == 0, serve.output()[-3000:]
    assert states and states[-1] == "CANCELLED", (states[-5:], serve.output()[-3000:])
    ((status, processed, deferred),) = _rows_of(db, flow_run_id)
    assert status == "cancelled"
    assert 1 <= processed < 7 and processed + deferred == 7
    out = serve.output()
    assert out.count("stopped by SIGTERM after committing") == 1, out[-3000:]
    assert "Traceback" not in out and "Query interrupted" not in out, out[-3000:]


def _rows_of(db: Path, flow_run_id: str) -> list[tuple[Any, ...]]:
    with connect(db, read_only=True) as con:
        return con.execute(
            "SELECT status, processed, deferred FROM processor_runs WHERE flow_run_id = ?",
            [flow_run_id],
        ).fetchall()
