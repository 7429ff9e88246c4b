"""Where the data and the state live: flag, then environment, then default."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = "./data/user_sessions"
DEFAULT_DB = "./data/state/pipeline.duckdb"
DEFAULT_MAX_ATTEMPTS = 5


class ConfigError(Exception):
    """A setting is present but unusable; the message is one line for the user."""


def data_dir(flag: str | os.PathLike[str] | None = None) -> Path:
    return Path(flag or os.environ.get("SESSION_DATA_DIR") or DEFAULT_DATA_DIR)


def db_path(flag: str | os.PathLike[str] | None = None) -> Path:
    return Path(flag or os.environ.get("SESSION_PIPELINE_DB") or DEFAULT_DB)


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
