"""The webhook over real HTTP, against a real Prefect server and a real DuckDB file."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from flows.prefect_api import PrefectAPI
from flows.webhook import create_app, main
from state.db import connect
from tests.conftest import user_line, write_session

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, app: Any) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "webhook did not start"
            time.sleep(0.05)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        return self.client

    def __exit__(self, *_: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _deploy(name: str) -> str:
    """A deployment of the processor's flow, as `serve` creates it (no worker needed to exist
    for the webhook's part: created runs simply wait)."""
    from flows.processor_flow import build_flow

    return str(build_flow(name).to_deployment(name=name).apply())


@pytest.fixture
def webhook(prefect_api: str, data_dir: Path, db: Path, linecount: Any) -> Iterator[httpx.Client]:
    app = create_app(data_dir, db, token=TOKEN, prefect_url=prefect_api)
    with Served(app) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        client.app_state = app.state.webhook  # type: ignore[attr-defined]
        yield client


def _audit(db: Path) -> list[tuple[Any, ...]]:
    with connect(db) as con:
        return con.execute(
            "SELECT action, processor_name, outcome, http_status, flow_run_id IS NOT NULL "
            "FROM trigger_audit ORDER BY requested_at"
        ).fetchall()


def _cancel_active(prefect_api: str, deployment_id: str) -> None:
    with PrefectAPI(prefect_api) as api:
        for run in api.flow_runs(deployment_ids=[deployment_id]):
            api.force_state(run["id"], "CANCELLED", "test cleanup")


def test_wrong_or_missing_token_is_401_counted_and_never_written(
    webhook: httpx.Client, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for headers in (
        {"Authorization": "Bearer nope"},
        {"Authorization": ""},
        {"Authorization": f"Basic {TOKEN}"},
    ):
        response = webhook.post("/processors/linecount/runs", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    assert webhook.get("/health", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert not db.exists()  # refused calls stay out of the database (no lock, no growth)
    assert webhook.app_state.unauthorised == 4  # type: ignore[attr-defined]
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == [  # one line per 10 s at most, however many calls
        "refused 1 call(s) without the right bearer token (last: 127.0.0.1 "
        "POST /processors/linecount/runs; 1 since start)"
    ]


def test_unknown_and_disabled_processors_are_400_in_the_old_shape(
    webhook: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SP_TEST_DISABLED_KEY", raising=False)
    response = webhook.post("/processors/nope/runs")
    assert response.status_code == 400
    assert response.json()["detail"] == "Unknown processor 'nope'. Known: linecount, usage"
    response = webhook.post("/api/admin/run-session-processor", params={"processor": "disabled"})
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "Unknown processor 'disabled'. Known: linecount, usage. "
        "Processor 'disabled' is disabled: SP_TEST_DISABLED_KEY is not set"
    )
    response = webhook.post("/processors/verification/runs")  # no LLM configured here
    assert response.status_code == 400
    assert "Processor 'verification' is disabled: no LLM configured" in response.json()["detail"]


def test_no_deployment_is_503_with_the_way_out(webhook: httpx.Client) -> None:
    response = webhook.post("/processors/usage/runs")
    assert response.status_code == 503
    assert "start `session-pipeline serve`" in response.json()["detail"]


def test_twenty_concurrent_triggers_create_exactly_one_run(
    webhook: httpx.Client, prefect_api: str, db: Path
) -> None:
    deployment_id = _deploy("linecount")
    try:

        def fire(i: int) -> httpx.Response:
            path = (
                "/processors/linecount/runs"
                if i % 2
                else "/api/admin/run-session-processor?processor=linecount"
            )
            with httpx.Client(
                base_url=str(webhook.base_url), headers=webhook.headers, timeout=60
            ) as c:
                return c.post(path)

        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(fire, range(20)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [202] + [409] * 19, [r.text for r in responses]
        accepted = next(r.json() for r in responses if r.status_code == 202)
        assert accepted["processor"] == "linecount"
        assert accepted["ui_url"].endswith(f"/runs/flow-run/{accepted['flow_run_id']}")
        refused = next(r.json() for r in responses if r.status_code == 409)
        assert refused["detail"].startswith("Processor 'linecount' is already running")
        with PrefectAPI(prefect_api) as api:
            runs = api.flow_runs(deployment_ids=[deployment_id])
        assert [r["id"] for r in runs] == [accepted["flow_run_id"]]
        assert "trigger:webhook" in runs[0]["tags"]
        # named when created (not `agile-hare`), with the name the flow keeps when it starts
        assert re.fullmatch(r"linecount-\d{8}-\d{6}", accepted["flow_run_name"])
        assert runs[0]["name"] == accepted["flow_run_name"]
        outcomes = sorted(row[2] for row in _audit(db))
        assert outcomes == ["accepted"] + ["conflict"] * 19
    finally:
        _cancel_active(prefect_api, deployment_id)


def test_processors_listing(webhook: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_PIPELINE_LINECOUNT_INTERVAL", "45")
    listing = {p["name"]: p for p in webhook.get("/processors").json()}
    assert listing["linecount"]["cadence_seconds"] == 45 and listing["linecount"]["enabled"]
    assert listing["usage"]["cadence_seconds"] == 600
    assert listing["broken"]["enabled"] is False
    monkeypatch.setenv("SCHEDULER_USAGE_PROCESSOR_INTERVAL", "ten")
    usage = {p["name"]: p for p in webhook.get("/processors").json()}["usage"]
    assert usage["enabled"] is False and "must be a positive integer" in usage["reason"]


def test_health_moves_from_ok_to_warning_to_ok(
    webhook: httpx.Client, monkeypatch: pytest.MonkeyPatch, data_dir: Path, db: Path, linecount: Any
) -> None:
    from flows.pipeline import run_direct

    monkeypatch.setenv("SESSION_PIPELINE_LINECOUNT_INTERVAL", "5")  # grace 10 s, stuck past 40 s

    def status() -> dict[str, Any]:
        report = webhook.get("/health").json()
        return {p["processor"]: p for p in report["processors"]}["linecount"]

    assert status()["status"] == "ok"  # no files
    write_session(data_dir, "alice/a.jsonl", [user_line("a")])
    run_direct(linecount, data_dir, db, max_attempts=5)
    assert status()["status"] == "ok"
    late = write_session(data_dir, "alice/b.jsonl", [user_line("b")])
    assert status()["status"] == "ok"  # fresh: within the grace window
    os.utime(late, (time.time() - 20, time.time() - 20))
    seen = status()
    assert seen["status"] == "warning" and seen["pending"] == 1 and seen["lag_seconds"] >= 20
    os.utime(late, (time.time() - 60, time.time() - 60))
    seen = status()
    assert seen["status"] == "stuck" and seen["stuck_session"] == "alice/b.jsonl"
    run_direct(linecount, data_dir, db, max_attempts=5)
    seen = status()
    assert seen["status"] == "ok" and seen["pending"] == 0 and seen["last_run_at"] is not None


def test_refuses_a_public_address_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SESSION_PIPELINE_WEBHOOK_TOKEN", raising=False)
    assert main(["--host", "0.0.0.0", "--port", str(_free_port())]) == 1
    assert (
        "refusing to listen on 0.0.0.0 without SESSION_PIPELINE_WEBHOOK_TOKEN"
        in capsys.readouterr().err
    )
