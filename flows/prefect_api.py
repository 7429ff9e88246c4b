"""The few Prefect REST calls the webhook and `doctor` need, over plain httpx.

Creating a run this way costs ~12 ms, against ~37 ms plus a 680 ms import for
`run_deployment`; and the webhook stays a small service that does not load the engine.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

RETRIES = 6
RETRY_STATUSES = frozenset({429, 502, 503, 504})
ACTIVE_STATES = ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED")
GOING_STATES = ("PENDING", "RUNNING", "CANCELLING", "PAUSED")
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
# the message of a run the server cancelled under a deployment's CANCEL_NEW limit
COLLISION_MESSAGE = "Deployment concurrency limit reached."
# The flow run label that names the lease a run holds its processor's slot with: whoever
# finds the run dead (the runner's crash hook, doctor) releases exactly that lease.
LEASE_LABEL = "session-pipeline.slot-lease"


class PrefectUnavailable(RuntimeError):
    """The Prefect API cannot be reached or answered with an error; one line for users."""


def api_url(db: Path | None = None) -> str:
    """PREFECT_API_URL from the environment or the active Prefect profile; else, given the
    state database, the API of the `session-pipeline serve` running for it on this machine."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    if not url and db is not None:
        from flows.prefect_target import local_serve_api_url

        url = local_serve_api_url(db)
    if not url:
        where = f" for {db}" if db is not None else ""
        raise PrefectUnavailable(
            f"PREFECT_API_URL is not set and no `session-pipeline serve` is running{where} on "
            "this machine: start serve, or export PREFECT_API_URL=http://<host>:<port>/api"
        )
    return url.rstrip("/")


def ui_url(api: str, flow_run_id: str) -> str:
    base = os.environ.get("PREFECT_UI_URL") or api.removesuffix("/api")
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


class PrefectAPI:
    def __init__(self, url: str | None = None, *, timeout: float = 15.0) -> None:
        self.url = url or api_url()
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrefectAPI:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried with backoff while the server is busy (a SQLite-backed
        server answers 503 under concurrent writes), as Prefect's own client does."""
        for attempt in range(RETRIES + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                if attempt == RETRIES:
                    raise PrefectUnavailable(
                        f"Prefect API at {self.url} unreachable: {error}"
                    ) from None
            else:
                if response.status_code not in RETRY_STATUSES or attempt == RETRIES:
                    return response
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    time.sleep(min(float(retry_after), 5.0))
                    continue
            time.sleep(min(0.1 * 2**attempt, 2.0) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._call(method, path, **kwargs)
        if response.is_error:
            raise PrefectUnavailable(
                f"Prefect API {method} {path} answered {response.status_code}: "
                f"{response.text[:200]}"
            )
        return response.json() if response.content else None

    def healthy(self) -> bool:
        try:
            return self._http.get("/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    # deployments and runs ---------------------------------------------------------------

    def deployment(self, flow_name: str, deployment_name: str) -> dict[str, Any] | None:
        response = self._call("GET", f"/deployments/name/{flow_name}/{deployment_name}")
        if response.status_code == 404:
            return None
        if response.is_error:
            raise PrefectUnavailable(f"Prefect API answered {response.status_code}")
        return response.json()

    def flow_runs(
        self,
        *,
        deployment_ids: Iterable[str] | None = None,
        flow_names: Iterable[str] | None = None,
        states: Iterable[str] = ACTIVE_STATES,
        starting_before: datetime | None = None,
        tags: Iterable[str] | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        flow_run_filter: dict[str, Any] = {"state": {"type": {"any_": list(states)}}}
        if tags is not None:
            flow_run_filter["tags"] = {"all_": list(tags)}
        if deployment_ids is not None:
            flow_run_filter["deployment_id"] = {"any_": list(deployment_ids)}
        if starting_before is not None:
            flow_run_filter["expected_start_time"] = {"before_": starting_before.isoformat()}
        body: dict[str, Any] = {
            "flow_runs": flow_run_filter,
            "limit": limit,
            "sort": "START_TIME_DESC",
        }
        if flow_names is not None:
            body["flows"] = {"name": {"any_": list(flow_names)}}
        return self._json("POST", "/flow_runs/filter", json=body)

    def active_runs(self, deployment_id: str, trigger_tag: str) -> list[dict[str, Any]]:
        """Runs that are pending or running, and runs a trigger created that have not started
        yet. Runs the cadence scheduled for later are not: with short cadences one is always
        due soon, and the deployment's CANCEL_NEW limit cancels whichever of two comes second."""
        going = self.flow_runs(deployment_ids=[deployment_id], states=GOING_STATES)
        triggered = self.flow_runs(
            deployment_ids=[deployment_id], states=("SCHEDULED",), tags=[trigger_tag]
        )
        return going + triggered

    def create_run(
        self,
        deployment_id: str,
        *,
        tags: list[str],
        idempotency_key: str,
        parameters: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Create a run now. The idempotency key makes a retried request return the run the
        first attempt created instead of a second one."""
        body: dict[str, Any] = {"tags": tags, "idempotency_key": idempotency_key}
        if name is not None:
            body["name"] = name
        if parameters:
            body["parameters"] = parameters
        return self._json("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return self._json("GET", f"/flow_runs/{flow_run_id}")

    def set_labels(self, flow_run_id: str, labels: dict[str, str]) -> None:
        """Add labels to a flow run (the others stay)."""
        self._json("PATCH", f"/flow_runs/{flow_run_id}/labels", json=labels)

    def force_state(self, flow_run_id: str, state_type: str, message: str) -> None:
        self._json(
            "POST",
            f"/flow_runs/{flow_run_id}/set_state",
            json={"state": {"type": state_type, "message": message}, "force": True},
        )

    # global concurrency limits ----------------------------------------------------------

    def limit(self, name: str) -> dict[str, Any] | None:
        response = self._call("GET", f"/v2/concurrency_limits/{name}")
        if response.status_code == 404:
            return None
        if response.is_error:
            raise PrefectUnavailable(f"Prefect API answered {response.status_code}")
        return response.json()

    def ensure_limit(self, name: str, limit: int = 1) -> None:
        if self.limit(name) is None:
            response = self._call(
                "POST", "/v2/concurrency_limits/", json={"name": name, "limit": limit}
            )
            # Someone may have created it meanwhile (409, or a 500 from the unique index).
            if response.is_error and self.limit(name) is None:
                raise PrefectUnavailable(f"cannot create concurrency limit {name}")

    def try_lease(
        self, name: str, seconds: float = 60, *, holder_flow_run: str | None = None
    ) -> str | None:
        """Take one slot of a limit without waiting; None when it is taken. The lease expires
        by itself `seconds` after it was taken or last renewed (Prefect's minimum is 60), so
        a holder that dies frees the slot within that. A missing limit is an error: a slot
        that was never taken must never look taken."""
        body: dict[str, Any] = {
            "names": [name],
            "slots": 1,
            "mode": "concurrency",
            "lease_duration": seconds,
        }
        if holder_flow_run is not None:
            body["holder"] = {"type": "flow_run", "id": holder_flow_run}
        response = self._call("POST", "/v2/concurrency_limits/increment-with-lease", json=body)
        if response.status_code == 423:
            return None
        if response.is_error:
            raise PrefectUnavailable(
                f"Prefect API answered {response.status_code} taking slot {name}"
            )
        answer = response.json()
        if not answer.get("limits"):
            raise PrefectUnavailable(f"concurrency limit {name} does not exist")
        return str(answer["lease_id"])

    def renew_lease(self, lease_id: str, seconds: float = 60) -> bool:
        """Extend a lease to `seconds` from now; False when it is gone (expired, released)."""
        response = self._call(
            "POST",
            f"/v2/concurrency_limits/leases/{lease_id}/renew",
            json={"lease_duration": seconds},
        )
        if response.status_code in (404, 410):
            return False
        if response.is_error:
            raise PrefectUnavailable(
                f"Prefect API answered {response.status_code} renewing lease {lease_id}"
            )
        return True

    def release_lease(self, lease_id: str) -> None:
        self._call(
            "POST", "/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease_id}
        )
