"""`serve`: the one-machine route in one command. A supervisor of child processes: a Prefect
server (UI and API, unless PREFECT_API_URL names one), the runner serving every processor's
deployment, and the webhook.

Each child runs in its own session (process group), so a terminal Ctrl-C reaches only the
supervisor, which then stops the children in order (runner, webhook, server) with SIGTERM: the
Prefect runner ignores SIGINT. A child that outlives its grace period is killed with its whole
group, so no run subprocess is left behind either.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from flows.cadence import Cadence, cadence
from flows.doctor import doctor
from flows.names import flow_name
from flows.prefect_api import PrefectAPI, PrefectUnavailable
from flows.prefect_target import serve_file
from processors import registry
from state import config
from state.config import ConfigError
from state.db import Database, StateError, connect
from state.migrations import migrate

PROG = "session-pipeline"
SERVER_START_TIMEOUT = 90.0  # a first start creates the server's database: ~12 s on 2 cores
EXTERNAL_SERVER_TIMEOUT = 15.0  # someone else's server: it is up or it is not
READY_TIMEOUT = 60.0
STOP_GRACE = 15.0  # the runner waits for in-flight task runs when cancelling them
POLL = 0.25
MODULE = [sys.executable, "-m"]
PREFECT = [*MODULE, "prefect"]  # this interpreter's Prefect, whatever is first on PATH
SERVER_ENV = {
    # Leases that survive a server restart and expire properly, so no slot leaks.
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
        "prefect.server.concurrency.lease_storage.filesystem"
    ),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


DEFAULT_UI_HOST = "127.0.0.1"
DEFAULT_UI_PORT = 4200
HOST_ENV, PORT_ENV = "PREFECT_SERVER_API_HOST", "PREFECT_SERVER_API_PORT"


class ServeError(Exception):
    """serve cannot start or go on; one line for the user."""


def server_address(host: str | None, port: int | None) -> tuple[str, int]:
    """Where the Prefect server serve starts listens: the flags, else Prefect's own
    PREFECT_SERVER_API_HOST / PREFECT_SERVER_API_PORT, else 127.0.0.1:4200."""
    host = host or os.environ.get(HOST_ENV) or DEFAULT_UI_HOST
    if port is None:
        raw = os.environ.get(PORT_ENV)
        if raw is None:
            port = DEFAULT_UI_PORT
        elif not raw.strip().isdigit() or not 0 < int(raw) < 65536:
            raise ConfigError(f"{PORT_ENV} must be a port number (1-65535), got {raw!r}")
        else:
            port = int(raw)
    return host, port


# the local serve's address ----------------------------------------------------------------


def _write_serve_file(db: Database, api_url: str, ui: str | None, webhook: str) -> Path:
    path = serve_file(db)
    record = {
        "api_url": api_url,
        "ui_url": ui,
        "webhook_url": webhook,
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).isoformat(),
    }
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)
    return path


def _remove_serve_file(db: Database) -> None:
    """Remove the file if it is ours (another serve may have replaced it since)."""
    path = serve_file(db)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if int(json.loads(path.read_text())["pid"]) == os.getpid():
            path.unlink()


def port_in_use(host: str, port: int) -> bool:
    """Can nothing else be listening there? A bind test, with SO_REUSEADDR as servers use, so
    a port merely in TIME_WAIT after a previous serve counts as free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ServeError(f"cannot resolve host {host!r}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return True
    return False


def _url_host(host: str) -> str:
    """Where a client reaches a server bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@dataclass
class Plan:
    """Validated configuration: what will be served, and where."""

    data_dir: Path
    db: Database
    cadences: dict[str, Cadence]  # enabled processor -> its schedule
    disabled: dict[str, str]  # processor -> why


def check_config(data_dir: str | None, db: str | None) -> Plan:
    """Everything a child would fail on, checked before any child starts."""
    from flows.pipeline import check_data_dir

    data_path = config.data_dir(data_dir).resolve()
    db_path = config.db_path(db).resolve()
    check_data_dir(data_path)
    cadences: dict[str, Cadence] = {}
    disabled: dict[str, str] = {}
    for entry in registry.entries():
        if entry.enabled and entry.processor is not None:
            cadences[entry.name] = cadence(entry.processor)
        else:
            disabled[entry.name] = entry.problem or "disabled"
    if not cadences:
        raise ConfigError("no enabled processors to serve")
    with connect(db_path) as con:  # a --db that is not a DuckDB file fails here, not in a run
        migrate(con)
    return Plan(data_path, db_path, cadences, disabled)


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a child gets SIGTERM if the supervisor dies without stopping it (SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def arm() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return arm


class Child:
    """One supervised process, alone in its own session and process group."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str], **popen: Any) -> None:
        self.label = label
        self.proc = subprocess.Popen(
            argv, env=env, start_new_session=True, preexec_fn=_die_with_parent(), **popen
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, up to `grace` seconds to finish, then SIGKILL; then kill whatever it left
        in its process group (run subprocesses of a runner that had to be killed)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"{PROG}: {self.label} did not stop in {grace:g}s; killing it", flush=True)
                self._kill_group()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._kill_group()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # group empty: done
            os.killpg(self.proc.pid, signal.SIGKILL)


class Supervisor:
    """Starts the children, watches them, and stops them in order."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.signal_name: str | None = None

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.stopping.set()

    def start(self, label: str, argv: list[str], env: dict[str, str], **popen: Any) -> Child:
        child = Child(label, argv, env, **popen)
        self.children.append(child)
        return child

    def check(self) -> None:
        for child in self.children:
            code = child.exited()
            if code is not None and not self.stopping.is_set():
                raise ServeError(f"the {child.label} exited unexpectedly (exit code {code})")

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float) -> bool:
        """Poll `ready` until it holds; False if asked to stop meanwhile."""
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set():
            self.check()
            if ready():
                return True
            if time.monotonic() > deadline:
                raise ServeError(f"{what} was not ready after {timeout:g}s")
            self.stopping.wait(POLL)
        return False

    def stop_all(self) -> None:
        """Runner first (no new runs start), then the webhook, then the server they use."""
        order = {"runner": 0, "webhook": 1, "Prefect server": 2}
        for child in sorted(self.children, key=lambda c: order.get(c.label, 1)):
            child.stop()


def _answers(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            httpx.get(url, timeout=2)
        except httpx.HTTPError:
            return False
        return True

    return probe


def _healthy(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


def _deployments_served(api_url: str, names: list[str]) -> Callable[[], bool]:
    """The runner has (re)applied every deployment: each exists and is not paused (a
    previous serve paused them when it stopped)."""

    def probe() -> bool:
        try:
            with PrefectAPI(api_url, timeout=5) as api:
                for name in names:
                    deployment = api.deployment(flow_name(name), name)
                    if deployment is None or deployment.get("paused"):
                        return False
        except PrefectUnavailable:
            return False
        return True

    return probe


def _every(schedule: Cadence) -> str:
    seconds = schedule.interval
    if seconds is None:
        return f"at cron {schedule.cron} (UTC)"
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"every {seconds // size} {unit}"
    return f"every {seconds} s"


def _run(
    sup: Supervisor,
    plan: Plan,
    ui_host: str,
    ui_port: int,
    webhook_host: str,
    webhook_port: int,
) -> int:
    env = dict(os.environ)
    api_url = env.get("PREFECT_API_URL")
    ui = None
    if not api_url:
        ui = f"http://{_url_host(ui_host)}:{ui_port}"
        api_url = f"{ui}/api"
        # The server's own address, so its UI calls this API whatever the port (by default
        # the UI is told 127.0.0.1:4200, another server or none).
        server_env = {
            **env,
            **SERVER_ENV,
            "PREFECT_API_URL": api_url,
            "PREFECT_UI_API_URL": api_url,
            HOST_ENV: ui_host,
            PORT_ENV: str(ui_port),
        }
        print(f"{PROG}: starting the Prefect server on {ui} …", flush=True)
        sup.start(
            "Prefect server",
            [*PREFECT, "server", "start", "--host", ui_host, "--port", str(ui_port)],
            server_env,
            stdout=subprocess.DEVNULL,  # its banner tells users to `prefect config set`
        )
        if not sup.wait_for(
            f"the Prefect server at {api_url}", _healthy(f"{api_url}/health"), SERVER_START_TIMEOUT
        ):
            return 0
    elif not sup.wait_for(
        f"the Prefect server at {api_url} (PREFECT_API_URL)",
        _healthy(f"{api_url.rstrip('/')}/health"),
        EXTERNAL_SERVER_TIMEOUT,
    ):
        return 0
    api_url = api_url.rstrip("/")
    env["PREFECT_API_URL"] = api_url

    try:
        with PrefectAPI(api_url) as api:
            report = doctor(plan.db, api)
        lines = report.lines() or ["no zombie runs, no leaked concurrency slots"]
    except (PrefectUnavailable, StateError) as error:
        lines = [f"skipped: {error}"]
    except Exception as error:  # a check must not keep the pipeline from being served
        lines = [f"failed: {type(error).__name__}: {error}"]
    for line in lines:
        print(f"{PROG}: doctor: {line}", flush=True)

    if sup.stopping.is_set():
        return 0
    paths = ["--data-dir", str(plan.data_dir), "--db", str(plan.db)]
    sup.start("runner", [*MODULE, "flows.runner", *paths], env)
    webhook = f"http://{_url_host(webhook_host)}:{webhook_port}"
    _write_serve_file(plan.db, api_url, ui, webhook)
    sup.start(
        "webhook",
        [*MODULE, "flows.webhook", "--host", webhook_host, "--port", str(webhook_port), *paths],
        env,
    )
    names = list(plan.cadences)
    if not sup.wait_for("the webhook", _answers(f"{webhook}/health"), READY_TIMEOUT):
        return 0
    if not sup.wait_for(
        "the runner's deployments", _deployments_served(api_url, names), READY_TIMEOUT
    ):
        return 0

    print(f"{PROG}: serving {len(names)} processor(s)", flush=True)
    if ui:
        print(f"  Prefect UI   {ui}", flush=True)
    print(f"  Prefect API  {api_url}", flush=True)
    print(f"  webhook      {webhook}  (POST /processors/<name>/runs, GET /health)", flush=True)
    print(f"  data dir     {plan.data_dir}", flush=True)
    print(f"  state db     {plan.db}  (serve's address in {serve_file(plan.db).name})", flush=True)
    for name, schedule in plan.cadences.items():
        print(f"  {name:<12} {_every(schedule)}  (deployment {flow_name(name)}/{name})", flush=True)
    for name, why in plan.disabled.items():
        print(f"  {name:<12} disabled: {why}", flush=True)
    print(f"{PROG}: press Ctrl-C (or send SIGTERM) to stop", flush=True)

    while not sup.stopping.is_set():
        sup.check()
        sup.stopping.wait(0.5)
    return 0


def serve(
    data_dir: str | None,
    db: str | None,
    *,
    ui_host: str | None = None,
    ui_port: int | None = None,
    webhook_host: str = "127.0.0.1",
    webhook_port: int = 8787,
) -> int:
    """Run the server (unless PREFECT_API_URL is set), the runner and the webhook until
    SIGINT/SIGTERM (exit 0) or until one of them dies (exit 1). Call from the main thread.
    The server listens on `ui_host`:`ui_port`, by default PREFECT_SERVER_API_HOST/PORT or
    127.0.0.1:4200."""
    try:
        from flows.webhook import TOKEN_ENV, is_loopback

        ui_host, ui_port = server_address(ui_host, ui_port)

        if not is_loopback(webhook_host) and not os.environ.get(TOKEN_ENV):
            raise ServeError(f"refusing to listen on {webhook_host} without {TOKEN_ENV}")
        wanted = [(webhook_host, webhook_port)]
        if not os.environ.get("PREFECT_API_URL"):
            wanted.insert(0, (ui_host, ui_port))
        for host, port in wanted:
            if port_in_use(host, port):
                raise ServeError(
                    f"port {port} on {host} is in use (is another session-pipeline serve running?)"
                )
        plan = check_config(data_dir, db)
    except (ServeError, ConfigError, StateError, registry.UnknownProcessorError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 1

    sup = Supervisor()
    handled = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {s: signal.signal(s, sup.on_signal) for s in handled}
    try:
        code = _run(sup, plan, ui_host, ui_port, webhook_host, webhook_port)
        if sup.signal_name:
            print(f"{PROG}: {sup.signal_name} received, stopping", flush=True)
    except ServeError as error:
        print(f"{PROG}: error: {error}; stopping", file=sys.stderr, flush=True)
        code = 1
    finally:
        sup.stop_all()
        _remove_serve_file(plan.db)
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"{PROG}: stopped", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.serve`, the same as `session-pipeline serve`."""
    parser = argparse.ArgumentParser(prog=f"{PROG} serve")
    parser.add_argument("--data-dir")
    parser.add_argument("--db")
    parser.add_argument("--ui-host", help=f"default ${HOST_ENV} or {DEFAULT_UI_HOST}")
    parser.add_argument("--ui-port", type=int, help=f"default ${PORT_ENV} or {DEFAULT_UI_PORT}")
    parser.add_argument("--webhook-host", default="127.0.0.1")
    parser.add_argument("--webhook-port", type=int, default=8787)
    args = parser.parse_args(argv)
    return serve(
        args.data_dir,
        args.db,
        ui_host=args.ui_host,
        ui_port=args.ui_port,
        webhook_host=args.webhook_host,
        webhook_port=args.webhook_port,
    )


if __name__ == "__main__":
    sys.exit(main())
