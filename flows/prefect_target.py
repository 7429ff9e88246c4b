"""Which Prefect server, if any, a command should use: found without importing Prefect (an
import costs about a second, more than a whole run with nothing to do).

`PREFECT_API_URL` from the environment, else from the active Prefect profile
(`$PREFECT_HOME/profiles.toml`), else the API of a `session-pipeline serve` running on this
machine for the same state file (it records itself in `serve_file(db)`). None: there is no
server; the command line then runs in its own process.
"""

from __future__ import annotations

import json
import os
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any


def serve_file(db: Any) -> Path:
    """`pipeline.duckdb.serve.json` beside the state database (see `state.db.sidecar`): the
    API URL and pid of the `serve` running for it, so `doctor` and `run` find it without
    PREFECT_API_URL."""
    from state.db import location, sidecar

    return sidecar(location(db), "serve.json")


def profile_api_url() -> str | None:
    """PREFECT_API_URL of the active Prefect profile, if it sets one."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    settings = profiles.get("profiles", {}).get(active, {})
    url = settings.get("PREFECT_API_URL") if isinstance(settings, dict) else None
    return url if isinstance(url, str) and url else None


def local_serve_api_url(db: Path | str) -> str | None:
    """The Prefect API URL of the `session-pipeline serve` running for this state database
    on this machine, or None (none running; a file left by one that died is ignored)."""
    try:
        record = json.loads(serve_file(db).read_text())
        pid, url = int(record["pid"]), str(record["api_url"])
        started = datetime.fromisoformat(record["started_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    from flows.doctor import process_alive  # (only when a serve has left its address)

    return url if process_alive(pid, started) else None


def prefect_api_url(db: Path) -> str | None:
    """The Prefect API a command should talk to, or None when there is none."""
    return os.environ.get("PREFECT_API_URL") or profile_api_url() or local_serve_api_url(db)
