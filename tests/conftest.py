from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import settings

# Property tests draw the same examples on every run by default, so a gate (CI, a commit)
# cannot fail on a draw it never saw before; `HYPOTHESIS_PROFILE=explore` draws new ones on
# every run, to hunt for bugs.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
EXAMPLES = ROOT / "examples" / "sessions"


def write_session(data_dir: Path, key: str, lines: list[Any], *, newline: bool = True) -> Path:
    """Write a transcript at `<data_dir>/<key>`: dicts become JSON lines, str/bytes are raw."""
    path = data_dir / key
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = []
    for line in lines:
        if isinstance(line, bytes):
            chunks.append(line)
        elif isinstance(line, str):
            chunks.append(line.encode())
        else:
            chunks.append(orjson.dumps(line))
    body = b"\n".join(chunks) + (b"\n" if newline and chunks else b"")
    path.write_bytes(body)
    return path


def user_line(
    text: str, session_id: str = "s1", ts: str = "2026-11-01T10:00:00Z"
) -> dict[str, Any]:
    return {
        "type": "user",
        "uuid": f"u-{abs(hash((text, ts)))}",
        "parentUuid": None,
        "sessionId": session_id,
        "timestamp": ts,
        "isSidechain": False,
        "userType": "external",
        "cwd": "/repo",
        "gitBranch": "main",
        "version": "2.1.3",
        "message": {"role": "user", "content": text},
    }


LLM_SETTINGS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "SESSION_PIPELINE_LLM_API_KEY",
    "SESSION_PIPELINE_LLM_PROVIDER",
    "SESSION_PIPELINE_LLM_BASE_URL",
    "SESSION_PIPELINE_LLM_MODEL",
)


@pytest.fixture(autouse=True)
def no_llm_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see the verification processor unconfigured unless they configure it (against
    the loopback fake), whatever the machine's environment holds: no test reaches out."""
    for name in LLM_SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "sessions"
    path.mkdir()
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "pipeline.duckdb"


@pytest.fixture
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Install the test processors (linecount, broken, disabled) through real entry points."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), *sys.path]))
    yield PLUGINS


@pytest.fixture
def linecount(test_plugins: Path) -> Any:
    from processors import registry

    return registry.get("linecount")


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect server (subprocess, temporary SQLite) for end-to-end tests; heartbeats
    off so a flow run has no 1 s floor. Yields the API URL for subprocesses."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with (
        prefect_test_harness(server_startup_timeout=120),
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        url = PREFECT_API_URL.value()
        assert url
        yield url


def subprocess_env(api_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    env.update(extra)
    return env


# --- PostgreSQL: a real server, one fresh schema per test ------------------------------------

POSTGRES_URL = os.environ.get(
    "SESSION_PIPELINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _postgres_unreachable(url: str) -> str | None:
    """Why the test server cannot be used, in one line, or None."""
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3) as con:
            con.execute("SELECT 1")
    except Exception as error:
        return str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test server's URL. Unreachable: the test is skipped with the reason, unless
    `SESSION_PIPELINE_REQUIRE_POSTGRES=1` (CI), which fails it."""
    reason = _postgres_unreachable(POSTGRES_URL)
    if reason is not None:
        message = f"PostgreSQL not reachable at {POSTGRES_URL}: {reason}"
        if os.environ.get("SESSION_PIPELINE_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return POSTGRES_URL


def postgres_schema_url(base: str, schema: str) -> str:
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_db(postgres_url: str) -> Iterator[Any]:
    """A `PostgresDatabase` in a schema of its own, dropped afterwards."""
    import uuid

    import psycopg

    from state.db import location

    schema = f"test_{uuid.uuid4().hex[:12]}"
    yield location(postgres_schema_url(postgres_url, schema))
    with psycopg.connect(postgres_url, autocommit=True) as con:
        con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["duckdb", "postgresql"])
def state_db(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The state database on each backend: a DuckDB file, then a PostgreSQL schema."""
    if request.param == "duckdb":
        return tmp_path / "state" / "pipeline.duckdb"
    return request.getfixturevalue("pg_db")


# --- the command line, called in-process ----------------------------------------------------


def cli_call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`session-pipeline *argv` in this process: its exit code, stdout and stderr."""
    from flows.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The error a command printed, which must be one line and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]
