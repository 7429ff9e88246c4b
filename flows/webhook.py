"""The webhook: ad-hoc runs over HTTP, plus health. Prefect OSS has no inbound webhooks.

A trigger authenticates the caller, validates the processor, takes a short Prefect lease named
after the processor (so concurrent triggers, from any number of webhook processes, serialise:
the old system's in-process lock let two workers run one processor at once), refuses with 409
while that processor has a run going or about to start, and otherwise creates a flow run of
its deployment through the Prefect REST API. Every call is written to `trigger_audit`.

Hostile clients get bounded answers: no endpoint takes a body, so a body over 64 KB is refused
with 413 before it is read (a streamed one the moment it passes the limit), a body or request
head that trickles in slower than the timeouts is dropped, bad query parameters get 422 with a
one-line detail, and past `MAX_CONNECTIONS` new requests get 503 instead of piling up.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from flows.cadence import cadence
from flows.health import health
from flows.names import flow_name, new_run_name, trigger_limit_name
from flows.prefect_api import (
    COLLISION_MESSAGE,
    TERMINAL_STATES,
    PrefectAPI,
    PrefectUnavailable,
    api_url,
    ui_url,
)
from processors import registry
from state import config
from state.config import ConfigError
from state.db import Database, StateError, connect
from state.migrations import migrate

TOKEN_ENV = "SESSION_PIPELINE_WEBHOOK_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
TRIGGER_LEASE_SECONDS = 60
WAIT_POLL_SECONDS = 0.5
TRIGGER_TAG = "trigger:webhook"
MAX_WAIT_SECONDS = 24 * 3600
# Limits against hostile or broken clients (see RequestLimits and server_config).
MAX_BODY_BYTES = 64 * 1024  # no endpoint reads a body
BODY_TIMEOUT_SECONDS = 15.0  # a body must arrive within this, once its head has
HEAD_TIMEOUT_SECONDS = 15.0  # a connection must complete a request head within this
MAX_CONNECTIONS = 500  # open connections and running requests; past it, 503
# Refused (401) calls are counted and logged, never written to the database: a flood of them
# must not compete with runs for its lock. One log line per this many seconds at most.
REFUSED_LOG_SECONDS = 10.0
log = logging.getLogger("session_pipeline.webhook")


class Refusal(Exception):
    """An answer other than success, with its HTTP status and one-line reason."""

    def __init__(self, status: int, message: str, outcome: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.outcome, self.extra = status, outcome, extra


def _known(entries: list[registry.Entry]) -> str:
    return ", ".join(e.name for e in entries if e.enabled) or "none"


def _validate(name: str) -> registry.Entry:
    """The old wording for unknown processors; the reason too when one is disabled."""
    entries = registry.entries()
    entry = next((e for e in entries if e.name == name), None)
    message = f"Unknown processor '{name}'. Known: {_known(entries)}"
    if entry is None:
        raise Refusal(400, message, "unknown")
    if not entry.enabled:
        raise Refusal(
            400, f"{message}. Processor '{name}' is disabled: {entry.problem}", "disabled"
        )
    return entry


def _figures(db: Database, flow_run_id: str) -> dict[str, Any] | None:
    with connect(db) as con:
        migrate(con)
        cursor = con.execute(
            "SELECT processor_name AS processor, scanned, processed, skipped, errors, quarantined, "
            "quarantined_held, deferred, items_extracted, errors_detail, duration_seconds "
            "FROM processor_runs WHERE flow_run_id = ? AND status = 'completed'",
            [flow_run_id],
        )
        row = cursor.fetchone()
        if row is None:
            return None
        names = [d[0] for d in cursor.description or []]
    figures = dict(zip(names, row, strict=True))
    figures["errors_detail"] = orjson.loads(figures["errors_detail"] or "[]")
    return figures


class Webhook:
    """The trigger logic, independent of HTTP framing (and so testable as plain calls)."""

    def __init__(
        self, data_dir: Path, db: Database, token: str | None, prefect_url: str | None
    ) -> None:
        self.data_dir, self.db, self.token = data_dir, db, token or None
        self.prefect_url = prefect_url
        self.unauthorised = 0  # refused calls since start
        self._unlogged = 0
        self._logged_at = float("-inf")
        self._refusals = threading.Lock()

    def api(self) -> PrefectAPI:
        return PrefectAPI(self.prefect_url or api_url(self.db))

    def refused(self, caller: str, path: str) -> None:
        """Count a 401 and log it, at most one line per REFUSED_LOG_SECONDS."""
        with self._refusals:
            self.unauthorised += 1
            self._unlogged += 1
            now = time.monotonic()
            if now - self._logged_at < REFUSED_LOG_SECONDS:
                return
            count, self._unlogged, self._logged_at = self._unlogged, 0, now
        log.warning(
            "refused %d call(s) without the right bearer token (last: %s %s; %d since start)",
            count,
            caller,
            path,
            self.unauthorised,
        )

    def authorised(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, supplied = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            supplied.strip().encode(), self.token.encode()
        )

    def trigger(self, name: str, *, wait: bool, wait_timeout: float) -> tuple[int, dict[str, Any]]:
        _validate(name)
        with self.api() as api:
            deployment = api.deployment(flow_name(name), name)
            if deployment is None:
                raise Refusal(
                    503,
                    f"Processor '{name}' has no deployment {flow_name(name)}/{name}: "
                    "start `session-pipeline serve` or run `prefect deploy --all`",
                    "no_deployment",
                )
            mutex = trigger_limit_name(name)
            api.ensure_limit(mutex)
            lease = api.try_lease(mutex, TRIGGER_LEASE_SECONDS)
            if lease is None:
                raise Refusal(409, f"Processor '{name}' is already running", "conflict")
            try:
                active = api.active_runs(deployment["id"], TRIGGER_TAG)
                if active:
                    run = active[0]
                    raise Refusal(
                        409,
                        f"Processor '{name}' is already running (flow run '{run['name']}', "
                        f"{run['state_type'].lower()})",
                        "conflict",
                        flow_run_id=run["id"],
                    )
                run = api.create_run(
                    deployment["id"],
                    tags=["session-pipeline", f"processor:{name}", TRIGGER_TAG],
                    idempotency_key=f"webhook-{lease}",
                    name=new_run_name(name),  # the run keeps it: the answer and the UI agree
                )
            finally:
                api.release_lease(lease)
            accepted = {
                "processor": name,
                "flow_run_id": run["id"],
                "flow_run_name": run["name"],
                "ui_url": ui_url(api.url, run["id"]),
            }
            if not wait:
                return 202, accepted
            return self._wait(api, name, run["id"], wait_timeout)

    def _wait(
        self, api: PrefectAPI, name: str, flow_run_id: str, timeout: float
    ) -> tuple[int, dict[str, Any]]:
        """The old synchronous answer: `{"ok": errors == 0, "details": stats}`."""
        deadline = time.monotonic() + timeout
        while True:
            run = api.flow_run(flow_run_id)
            state = run.get("state_type")
            if state in TERMINAL_STATES:
                break
            if time.monotonic() >= deadline:
                raise Refusal(
                    504,
                    f"Processor '{name}' run {flow_run_id} still {str(state).lower()} after "
                    f"{timeout:g}s; it goes on",
                    "timeout",
                    flow_run_id=flow_run_id,
                )
            time.sleep(WAIT_POLL_SECONDS)
        message = (run.get("state") or {}).get("message") or ""
        if state == "CANCELLED" and message == COLLISION_MESSAGE:
            # a scheduled run started between our check and this run: it does the work
            raise Refusal(
                409, f"Processor '{name}' is already running", "conflict", flow_run_id=flow_run_id
            )
        figures = _figures(self.db, flow_run_id) if state == "COMPLETED" else None
        if figures is None:
            message = message or f"run ended {state}"
            raise Refusal(500, message, "failed", flow_run_id=flow_run_id)
        return 200, {"ok": figures["errors"] == 0, "details": figures, "flow_run_id": flow_run_id}

    def audit(
        self,
        caller: str,
        name: str | None,
        status: int,
        outcome: str,
        body: dict[str, Any],
        error: str | None,
    ) -> None:
        details = body.get("details")
        with connect(self.db) as con:
            migrate(con)
            con.execute(
                "INSERT INTO trigger_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?::JSON, ?)",
                [
                    datetime.now(UTC),
                    caller,
                    f"run_session_processor:{name}",
                    name,
                    outcome,
                    status,
                    body.get("flow_run_id"),
                    orjson.dumps(details).decode() if details is not None else None,
                    error,
                ],
            )

    def processors(self) -> list[dict[str, Any]]:
        listing = []
        for e in registry.entries():
            item: dict[str, Any] = {
                "name": e.name,
                "version": e.processor.version if e.processor else None,
                "enabled": e.enabled,
                "reason": e.problem,
                "cadence_seconds": None,
            }
            if e.processor is not None:
                try:
                    item["cadence_seconds"] = cadence(e.processor).gap_seconds
                except ConfigError as error:
                    item["enabled"], item["reason"] = False, str(error)
            listing.append(item)
        return listing


async def _refuse(send: Any, status: int, detail: str) -> None:
    """A JSON answer that also closes the connection (the rest of the request is unread)."""
    body = orjson.dumps({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """Pure ASGI middleware bounding what a request may send before the app runs.

    A declared `Content-Length` over `max_body` is refused with 413 at once, its body never
    read. Otherwise the body is read here, counted as it streams in (a chunked body is refused
    the moment it passes the limit), and must arrive within `body_timeout` (else 408); the app
    then gets it replayed. The server never buffers more than `max_body` of any request.
    """

    def __init__(
        self,
        app: Any,
        max_body: int = MAX_BODY_BYTES,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ) -> None:
        self.app, self.max_body, self.body_timeout = app, max_body, body_timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = f"Request body over {self.max_body} bytes; no endpoint takes a body"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await _refuse(send, 413, too_big)
            return
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                await _refuse(send, 408, f"Request body not received in {self.body_timeout:g}s")
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await _refuse(send, 413, too_big)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _one_line(error: RequestValidationError) -> str:
    """`query parameter 'wait': Input should be a valid boolean, …` for each problem."""
    problems = []
    for problem in error.errors():
        where = [str(part) for part in problem.get("loc", ())]
        place = f"{where[0]} parameter '{where[-1]}'" if len(where) > 1 else "request"
        problems.append(f"{place}: {' '.join(str(problem.get('msg', 'invalid')).split())}")
    return "; ".join(problems) or "invalid request"


def create_app(
    data_dir: Path | None = None,
    db: Database | None = None,
    *,
    token: str | None = None,
    prefect_url: str | None = None,
    max_body: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
) -> FastAPI:
    hook = Webhook(
        config.data_dir(data_dir),
        config.db_path(db),
        token if token is not None else os.environ.get(TOKEN_ENV),
        prefect_url,
    )
    app = FastAPI(title="session-pipeline webhook", docs_url=None, redoc_url=None)
    app.state.webhook = hook
    app.add_middleware(RequestLimits, max_body=max_body, body_timeout=body_timeout)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(error)}, status_code=422)

    def unauthorised(request: Request, caller: str) -> JSONResponse:
        hook.refused(caller, f"{request.method} {request.url.path}")
        return JSONResponse(
            {"detail": "Missing or wrong bearer token"}, 401, {"WWW-Authenticate": "Bearer"}
        )

    def guarded(
        request: Request, name: str | None, call: Callable[[], tuple[int, dict[str, Any]]]
    ) -> JSONResponse:
        caller = request.client.host if request.client else "unknown"
        outcome, error = "accepted", None
        if not hook.authorised(request.headers.get("authorization")):
            return unauthorised(request, caller)
        try:
            status, body = call()
            outcome = "accepted" if status == 202 else "completed"
        except Refusal as refusal:
            status, outcome, error = refusal.status, refusal.outcome, str(refusal)
            body = {"detail": str(refusal), **refusal.extra}
        except (PrefectUnavailable, StateError) as unavailable:
            status, outcome, error = 503, "unavailable", str(unavailable)
            body = {"detail": str(unavailable)}
        except Exception as unexpected:  # the old contract: 500 with the text
            status, outcome = 500, "error"
            error = f"{type(unexpected).__name__}: {unexpected}"
            body = {"detail": error}
        try:
            hook.audit(caller, name, status, outcome, body, error)
        except StateError as audit_error:
            body.setdefault("audit", f"not recorded: {audit_error}")
        return JSONResponse(body, status_code=status)

    def run_call(name: str, wait: bool, timeout: float) -> Callable[[], tuple[int, dict[str, Any]]]:
        return lambda: hook.trigger(name, wait=wait, wait_timeout=timeout)

    def wait_timeout() -> Any:
        return Query(3600.0, gt=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False)

    @app.post("/processors/{name}/runs")
    def trigger_run(
        request: Request, name: str, wait: bool = False, timeout: float = wait_timeout()
    ) -> JSONResponse:
        return guarded(request, name, run_call(name, wait, timeout))

    @app.post("/api/admin/run-session-processor")
    def trigger_run_old_path(
        request: Request, processor: str, wait: bool = False, timeout: float = wait_timeout()
    ) -> JSONResponse:
        return guarded(request, processor, run_call(processor, wait, timeout))

    def reading(request: Request, produce: Callable[[], Any]) -> JSONResponse:
        if not hook.authorised(request.headers.get("authorization")):
            return unauthorised(request, request.client.host if request.client else "unknown")
        try:
            return JSONResponse(produce())
        except (StateError, ConfigError) as error:
            return JSONResponse({"detail": str(error)}, 503)

    @app.get("/health")
    def get_health(request: Request) -> JSONResponse:
        return reading(request, lambda: health(registry.entries(), hook.data_dir, hook.db))

    @app.get("/processors")
    def get_processors(request: Request) -> JSONResponse:
        return reading(request, hook.processors)

    return app


def _head_deadline_protocol(head_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline on request heads.

    uvicorn closes a keep-alive connection idle after a response, but a client that connects
    and sends nothing, or a header byte now and then, keeps its connection (and a file
    descriptor) forever. Here a connection that has not completed a request head within
    `head_timeout` of opening, or of its last response, is closed; a request being handled
    is never cut.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(head_timeout, self._check_head, None)

        def _check_head(self, cycle_then: Any) -> None:
            if self.transport.is_closing():
                return
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.cycle is cycle_then:  # no new request head since the last check
                self.transport.close()
                return
            self._head_timer = self.loop.call_later(head_timeout, self._check_head, self.cycle)

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._head_timer.cancel()  # another protocol owns the connection from here
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return HeadDeadlineH11


def server_options(
    *, head_timeout: float = HEAD_TIMEOUT_SECONDS, max_connections: int = MAX_CONNECTIONS
) -> dict[str, Any]:
    """uvicorn settings the webhook is served with (`uvicorn.run(app, **server_options())`)."""
    return {
        "http": _head_deadline_protocol(head_timeout),
        "limit_concurrency": max_connections,
        "timeout_keep_alive": 5,
    }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.webhook`: serve the webhook with uvicorn."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="session-pipeline webhook")
    parser.add_argument(
        "--host", default=os.environ.get("SESSION_PIPELINE_WEBHOOK_HOST", DEFAULT_HOST)
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("SESSION_PIPELINE_WEBHOOK_PORT", DEFAULT_PORT)),
    )
    parser.add_argument("--data-dir")
    parser.add_argument("--db")
    args = parser.parse_args(argv)
    token = os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and token is None:
        print(
            f"session-pipeline: error: refusing to listen on {args.host} without {TOKEN_ENV}",
            file=sys.stderr,
        )
        return 1
    app = create_app(
        Path(args.data_dir) if args.data_dir else None,
        config.db_path(args.db) if args.db else None,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=True,
        **server_options(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
