"""Where the data and the state live: flag, then environment, then default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = "./data/user_sessions"
DEFAULT_DB = "./data/state/pipeline.duckdb"
DEFAULT_MAX_ATTEMPTS = 5


class ConfigError(Exception):
    """A setting is present but unusable; the message is one line for the user."""


def data_dir(flag: str | os.PathLike[str] | None = None) -> Path:
    return Path(flag or os.environ.get("SESSION_DATA_DIR") or DEFAULT_DATA_DIR)


def db_path(flag: str | os.PathLike[str] | None = None) -> Any:
    """The state database: a DuckDB file's `Path`, or a `PostgresDatabase` for a
    `postgresql://` URL (see `state.db`)."""
    from state.db import location

    return location(flag or os.environ.get("SESSION_PIPELINE_DB") or DEFAULT_DB)


def positive_int(name: str, default: int) -> int:
    """Read a positive integer from the environment. Unset means the default; empty,
    non-integer or <= 0 is a configuration error, never silently the default."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value


DEFAULT_COMMIT_SECONDS = 5


def commit_seconds() -> int:
    """`SESSION_PIPELINE_COMMIT_SECONDS`: the most work (in seconds of reading) a run keeps
    uncommitted, and so the most a crash can cost. 0 commits after every task."""
    name, raw = "SESSION_PIPELINE_COMMIT_SECONDS", os.environ.get("SESSION_PIPELINE_COMMIT_SECONDS")
    if raw is None:
        return DEFAULT_COMMIT_SECONDS
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{name} must be a whole number of seconds >= 0, got {raw!r}")
    return value


def max_attempts(flag: int | None = None) -> int:
    if flag is not None:
        if flag <= 0:
            raise ConfigError(f"max attempts must be a positive integer, got {flag}")
        return flag
    return positive_int("SESSION_PIPELINE_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)


DEFAULT_LOCK_TIMEOUT_SECONDS = 60


def lock_timeout() -> int:
    """`SESSION_PIPELINE_DB_LOCK_TIMEOUT`: seconds to wait for another process's DuckDB lock."""
    return positive_int("SESSION_PIPELINE_DB_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_SECONDS)


DEFAULT_MAX_PER_RUN = 50


def max_per_run() -> int | None:
    """`SESSION_PROCESSOR_MAX_PER_RUN` (the old name): sessions a run of a processor that
    costs money or time may read; the rest are deferred to the next run. Empty or 0: no cap."""
    name = "SESSION_PROCESSOR_MAX_PER_RUN"
    raw = os.environ.get(name)
    if raw is None:
        return DEFAULT_MAX_PER_RUN
    if raw.strip() in ("", "0"):
        return None
    return positive_int(name, DEFAULT_MAX_PER_RUN)


def time_budget(processor_name: str) -> int | None:
    """`SESSION_PIPELINE_<NAME>_TIME_BUDGET`: seconds after which a run of that processor
    starts no new session (None when unset; 0 means no budget)."""
    name = f"SESSION_PIPELINE_{processor_name.upper()}_TIME_BUDGET"
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "0":
        return None if raw is None else 0
    return positive_int(name, 1)


def check_run_settings(max_attempts_flag: int | None = None) -> None:
    """Every setting a run reads, checked before it does any work: a bad value found half
    way through would leave a new database and an open ledger row behind."""
    max_attempts(max_attempts_flag)
    commit_seconds()
    lock_timeout()
    max_per_run()
