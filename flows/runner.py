"""The process that serves every enabled processor's deployment (`prefect.serve`).

One deployment per processor (flow `usage-processor`, deployment `usage`), on an interval
schedule counted from a fixed anchor (restarts never shift the cadence), with a deployment
concurrency limit of 1 and the CANCEL_NEW collision strategy: a run that comes due while
another is going is cancelled rather than queued. That is the old scheduler's "409, skip this
tick", and it means a cadence shorter than a run never builds a backlog (with ENQUEUE, runs
piled up and a triggered run could wait behind every late one). Each run
starts in a subprocess that loads the entrypoint `flows/processor_flow.py:<name>_processor`.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from flows.cadence import ANCHOR, cadence
from flows.names import flow_attribute, limit_name
from processors import registry
from state import config
from state.config import ConfigError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

POLL_ENV = "PREFECT_RUNNER_POLL_FREQUENCY"
# Prefect polls for runs to start every 10 s by default; a webhook trigger should start promptly.
DEFAULT_POLL_SECONDS = "2"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT_FILE = "flows/processor_flow.py"


def _poll_seconds() -> float:
    os.environ.setdefault(POLL_ENV, DEFAULT_POLL_SECONDS)
    raw = os.environ[POLL_ENV]
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{POLL_ENV} must be a positive number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{POLL_ENV} must be a positive number, got {raw!r}")
    return value


def _pin_paths(data_dir: str | None, db: str | None) -> dict[str, str]:
    """Deployment parameters: absolute paths, or none when not given. The runner works from
    the project root (so entrypoints are `flows/...`); a relative location from the
    environment or the default is pinned to an absolute one first, so flow subprocesses read
    the same place the caller meant."""
    parameters: dict[str, str] = {}
    if data_dir is not None:
        parameters["data_dir"] = str(Path(data_dir).resolve())
    else:
        os.environ["SESSION_DATA_DIR"] = str(config.data_dir(None).resolve())
    if db is not None:
        parameters["db"] = str(config.db_path(db).resolve())
    else:
        os.environ["SESSION_PIPELINE_DB"] = str(config.db_path(None).resolve())
    return parameters


def build_deployments(data_dir: str | None, db: str | None) -> list[RunnerDeployment]:
    """A deployment for every enabled processor. Changes the working directory to the project
    root: Prefect derives file entrypoints relative to it, and the run subprocesses inherit it."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron, Interval

    from flows.processor_flow import build_flow

    parameters = _pin_paths(data_dir, db)
    cadences = {
        e.name: cadence(e.processor)
        for e in registry.entries()
        if e.enabled and e.processor is not None
    }
    os.chdir(PROJECT_ROOT)
    result = []
    for name, schedule in cadences.items():
        if schedule.interval is not None:
            when = f"every {schedule.interval}s (anchored at {ANCHOR.isoformat()})"
            schedules = [Interval(timedelta(seconds=schedule.interval), anchor_date=ANCHOR)]
        else:
            when = f"at cron {schedule.cron} UTC"
            schedules = [Cron(str(schedule.cron), timezone="UTC")]
        deployment = build_flow(name).to_deployment(
            name=name,
            schedules=schedules,
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
            parameters=dict(parameters),
            tags=["session-pipeline", f"processor:{name}"],
            description=f"Runs the {name} processor {when}; one run at a time, a run that "
            "comes due while another is going is cancelled (the going one does its work).",
        )
        expected = f"{ENTRYPOINT_FILE}:{flow_attribute(name)}"
        if deployment.entrypoint != expected:  # a run subprocess could not load the flow
            raise RuntimeError(
                f"deployment {name} has entrypoint {deployment.entrypoint!r}, expected {expected!r}"
            )
        result.append(deployment)
    return result


def ensure_limits(names: list[str]) -> None:
    """Each processor's global concurrency limit exists before its first run (flows take it
    with strict=True, and a run must never go unprotected)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in names:
            client.upsert_global_concurrency_limit_by_name(limit_name(name), 1)


def serve_deployments(data_dir: str | None, db: str | None) -> None:
    """Register the deployments and serve them until SIGTERM (which pauses their schedules;
    the next start unpauses them). Blocks."""
    poll = _poll_seconds()  # before Prefect reads its settings
    deployments = build_deployments(data_dir, db)
    if not deployments:
        raise ConfigError("no enabled processors to serve")
    ensure_limits([d.name for d in deployments])
    import prefect

    prefect.serve(*deployments, query_seconds=poll)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.runner --data-dir X --db Y`."""
    parser = argparse.ArgumentParser(prog="session-pipeline runner")
    parser.add_argument("--data-dir")
    parser.add_argument("--db")
    args = parser.parse_args(argv)
    try:
        serve_deployments(args.data_dir, args.db)
    except ConfigError as error:
        print(f"session-pipeline: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
