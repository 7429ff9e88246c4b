"""Every error a user can cause is one line and a non-zero exit; nothing stored is touched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from state.db import connect
from state.migrations import migrate
from tests.conftest import cli_call as _call
from tests.conftest import one_line_error as _one_line_error


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        ((), 2, "the following arguments are required: command"),
        (("frobnicate",), 2, "invalid choice: 'frobnicate'"),
        (("run",), 2, "give a processor name or --all"),
        (("run", "usage", "--all"), 2, "give a processor name or --all"),
        (("run", "usage", "--max-attempts", "0"), 2, "expected a positive integer, got '0'"),
        (("run", "usage", "--time-budget", "soon"), 2, "expected a positive integer, got 'soon'"),
        (("run", "nope"), 1, "Unknown processor 'nope'. Known: usage"),
        (("reprocess", "nope"), 1, "Unknown processor 'nope'. Known: usage"),
        (("status", "--bogus"), 2, "unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors(
    capsys: pytest.CaptureFixture[str], db: Path, argv: tuple[str, ...], code: int, message: str
) -> None:
    extra = ("--db", str(db)) if argv and argv[0] in ("run", "reprocess") and code == 1 else ()
    got, _, err = _call(capsys, *argv, *extra)
    assert got == code
    assert message in _one_line_error(err)
    assert not db.exists()


def test_data_dir_that_is_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, db: Path
) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    code, _, err = _call(capsys, "run", "usage", "--data-dir", str(not_dir), "--db", str(db))
    assert code == 1
    assert _one_line_error(err).endswith(f"data dir {not_dir} is not a directory")


def test_db_that_is_not_duckdb_is_left_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    fake = tmp_path / "notes.duckdb"
    fake.write_text("my precious notes\n" * 100)
    before = fake.read_bytes()
    for argv in (
        ("run", "usage", "--data-dir", str(data_dir)),
        ("status",),
        ("migrate",),
        ("reprocess", "usage"),
    ):
        code, _, err = _call(capsys, *argv, "--db", str(fake))
        assert code == 1
        assert _one_line_error(err).endswith(f"{fake} is not a DuckDB database")
    assert fake.read_bytes() == before


def test_db_that_is_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _call(capsys, "status", "--db", str(tmp_path))
    assert code == 1
    assert "is a directory" in _one_line_error(err)


@pytest.mark.parametrize("value", ["", "three", "0", "-1"])
def test_bad_max_attempts_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    data_dir: Path,
    db: Path,
    value: str,
) -> None:
    monkeypatch.setenv("SESSION_PIPELINE_MAX_ATTEMPTS", value)
    code, _, err = _call(capsys, "run", "usage", "--data-dir", str(data_dir), "--db", str(db))
    assert code == 1
    assert "SESSION_PIPELINE_MAX_ATTEMPTS must be a positive integer" in _one_line_error(err)


def test_processors_lists_enabled_and_why_not(
    capsys: pytest.CaptureFixture[str], test_plugins: Path
) -> None:
    code, out, _ = _call(capsys, "processors", "--json")
    assert code == 0
    listed = {p["name"]: p for p in json.loads(out)}
    assert listed["usage"] == {
        "name": "usage",
        "version": listed["usage"]["version"],
        "cadence_seconds": 600,
        "enabled": True,
        "reason": None,
    }
    assert listed["disabled"]["enabled"] is False
    assert "SP_TEST_DISABLED_KEY" in listed["disabled"]["reason"]
    assert listed["broken"]["reason"].startswith("failed to load")
    code, out, _ = _call(capsys, "processors")
    assert "disabled: failed to load" in out and "600s" in out


def test_migrate_status_and_reprocess(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    code, out, _ = _call(capsys, "migrate", "--db", str(db))
    assert code == 0 and "applied" in out
    code, out, _ = _call(capsys, "migrate", "--db", str(db))
    assert code == 0 and "up to date" in out
    with connect(db) as con:
        migrate(con)
        con.execute(
            "INSERT INTO session_processor_state (processor_name, session_file, username, "
            "file_hash, processor_version, status, attempts) VALUES "
            "('usage', 'alice/a.jsonl', 'alice', 'h', '1', 'quarantined', 5), "
            "('usage', 'bob/b.jsonl', 'bob', 'h', '1', 'ok', 0)"
        )
    code, out, _ = _call(capsys, "status", "--db", str(db), "--json")
    (usage,) = [s for s in json.loads(out) if s["processor"] == "usage"]
    assert (usage["known"], usage["processed"], usage["quarantined"]) == (2, 1, 1)
    code, out, _ = _call(capsys, "reprocess", "usage", "--quarantined", "--db", str(db))
    assert code == 0 and out.startswith("1 session(s) of usage")
    code, out, _ = _call(capsys, "reprocess", "usage", "--user", "bob", "--db", str(db))
    assert out.startswith("1 session(s)")
    code, out, _ = _call(
        capsys, "reprocess", "usage", "--session", "zed/none.jsonl", "--db", str(db)
    )
    assert out.startswith("0 session(s)")
    code, out, _ = _call(capsys, "status", "--db", str(db))
    assert code == 0 and "usage" in out and "never" in out


def test_the_installed_command_prints_one_line(tmp_path: Path) -> None:
    """The real console script in a real process: no traceback, exit 1."""
    exe = Path(sys.executable).with_name("session-pipeline")
    result = subprocess.run(
        [str(exe), "run", "nope", "--db", str(tmp_path / "x.duckdb")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "session-pipeline: error: Unknown processor 'nope'. Known: usage"
    )


def test_query(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    code, _, err = _call(capsys, "query", "SELECT 1", "--db", str(db))
    assert code == 1 and "no state yet at" in _one_line_error(err)
    _call(capsys, "migrate", "--db", str(db))
    code, out, _ = _call(capsys, "query", "SELECT 41 + 1 AS answer", "--db", str(db), "--json")
    assert code == 0 and json.loads(out) == [{"answer": 42}]
    code, out, _ = _call(capsys, "query", "SELECT 'x' AS a, NULL AS b", "--db", str(db))
    assert out.splitlines()[0].split() == ["a", "b"]
    code, _, err = _call(capsys, "query", "SELEC nonsense", "--db", str(db))
    assert code == 1 and "syntax error" in _one_line_error(err)
    code, _, err = _call(capsys, "query", "DROP TABLE processor_runs", "--db", str(db))
    assert code == 1 and "read-only" in _one_line_error(err)
    assert _call(capsys, "query", "SELECT count(*) FROM processor_runs", "--db", str(db))[0] == 0


def test_doctor_without_a_prefect_server_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db: Path
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings({PREFECT_API_URL: None}):
        code, _, err = _call(capsys, "doctor", "--db", str(db))
    assert code == 1
    assert _one_line_error(err) == (
        "session-pipeline: error: PREFECT_API_URL is not set and no `session-pipeline serve` "
        f"is running for {db} on this machine: start serve, or export "
        "PREFECT_API_URL=http://<host>:<port>/api"
    )


def test_serve_and_webhook_refuse_bad_addresses(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db: Path
) -> None:
    code, _, err = _call(capsys, "serve", "--ui-port", "70000")
    assert code == 2 and "expected a port number" in _one_line_error(err)
    monkeypatch.delenv("SESSION_PIPELINE_WEBHOOK_TOKEN", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for argv in (("serve", "--webhook-host", "0.0.0.0"), ("webhook", "--host", "0.0.0.0")):
        code, _, err = _call(capsys, *argv, "--db", str(db))
        assert code == 1
        assert (
            "refusing to listen on 0.0.0.0 without SESSION_PIPELINE_WEBHOOK_TOKEN"
            in _one_line_error(err)
        )
    monkeypatch.setenv("SESSION_PIPELINE_WEBHOOK_PORT", "many")
    code, _, err = _call(capsys, "webhook", "--db", str(db))
    assert (
        code == 1
        and "SESSION_PIPELINE_WEBHOOK_PORT must be a positive integer" in _one_line_error(err)
    )


def test_commands_that_read_state_do_not_create_it(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    for argv in (("status",), ("query", "SELECT 1"), ("reprocess", "usage"), ("forget",)):
        code, _, err = _call(capsys, *argv, "--db", str(db))
        assert code == 1, argv
        assert _one_line_error(err) == (
            f"session-pipeline: error: no state yet at {db}: nothing has run there "
            "(`session-pipeline run --all` creates it; or pass --db / SESSION_PIPELINE_DB)"
        )
    assert not db.exists()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "SESSION_PIPELINE_COMMIT_SECONDS",
            "soon",
            "SESSION_PIPELINE_COMMIT_SECONDS must be a whole number",
        ),
        (
            "SESSION_PIPELINE_DB_LOCK_TIMEOUT",
            "0",
            "SESSION_PIPELINE_DB_LOCK_TIMEOUT must be a positive integer",
        ),
    ],
)
def test_bad_settings_are_found_before_any_work(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    data_dir: Path,
    db: Path,
    name: str,
    value: str,
    message: str,
) -> None:
    """Before: the flow began, the error printed twice, a new database and a ledger row left
    `running` forever. Now: one line, nothing created."""
    monkeypatch.setenv(name, value)
    code, _, err = _call(capsys, "run", "usage", "--data-dir", str(data_dir), "--db", str(db))
    assert code == 1 and message in _one_line_error(err)
    assert not db.exists()


def test_a_bad_setting_never_leaves_a_ledger_row_open(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path, db: Path
) -> None:
    from flows.pipeline import run_direct
    from processors.usage import UsageProcessor
    from state.config import ConfigError

    _call_migrate = main(["migrate", "--db", str(db)])
    assert _call_migrate == 0
    monkeypatch.setenv("SESSION_PIPELINE_COMMIT_SECONDS", "-3")
    with pytest.raises(ConfigError):
        run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    with connect(db) as con:
        assert con.execute("SELECT count(*) FROM processor_runs").fetchall() == [(0,)]


def test_run_all_says_what_it_skipped(
    capsys: pytest.CaptureFixture[str], test_plugins: Path, tmp_path: Path, db: Path
) -> None:
    """Only the skip notices are checked here (the run itself is an end-to-end test): a
    missing data dir stops the command after them, before any work."""
    code, _, err = _call(
        capsys, "run", "--all", "--data-dir", str(tmp_path / "absent"), "--db", str(db)
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert "disabled: skipped: " in "\n".join(lines) and "SP_TEST_DISABLED_KEY" in err
    assert any(line.startswith("broken: skipped: failed to load") for line in lines)
    assert lines[-1].startswith("session-pipeline: error: data dir ")


def test_status_shows_a_failed_last_run_and_missing_sessions(
    capsys: pytest.CaptureFixture[str], db: Path, data_dir: Path
) -> None:
    assert _call(capsys, "migrate", "--db", str(db))[0] == 0
    with connect(db) as con:
        con.execute(
            "INSERT INTO processor_runs (run_id, processor_name, started_at, finished_at, status, errors) "
            "VALUES ('r1', 'usage', TIMESTAMPTZ '2026-01-01 10:00:00+00', TIMESTAMPTZ '2026-01-01 10:00:05+00', 'completed', 0), "
            "('r2', 'usage', TIMESTAMPTZ '2026-01-02 10:00:00+00', TIMESTAMPTZ '2026-01-02 10:00:01+00', 'failed', NULL)"
        )
        con.execute(
            "INSERT INTO session_processor_state (processor_name, session_file, status) "
            "VALUES ('usage', 'alice/gone.jsonl', 'missing')"
        )
    code, out, _ = _call(capsys, "status", "--db", str(db), "--data-dir", str(data_dir))
    assert code == 0
    header, _, row = out.splitlines()[:3]
    assert header.split() == [
        "processor",
        "known",
        "processed",
        "failed",
        "quarantined",
        "missing",
        "last",
        "run",
    ]
    assert row.split()[:6] == ["usage", "1", "0", "0", "0", "1"]
    assert row.endswith("2026-01-02 10:00:01 UTC (failed)")
    code, out, _ = _call(capsys, "processors", "--db", str(db), "--data-dir", str(data_dir))
    assert code == 0 and "usage" in out


def _isolated_env(tmp_path: Path) -> dict[str, str]:
    """No Prefect server anywhere: no PREFECT_* variables, an empty Prefect home."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def test_without_a_prefect_server_run_works_in_its_own_process_without_prefect(
    tmp_path: Path, db: Path
) -> None:
    """No temporary server, no Prefect import: the same ledger row and figures, and one line
    saying where the UI is."""
    import shutil

    from tests.conftest import EXAMPLES

    data_dir = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    script = (
        "import json, sys; from flows.cli import main; "
        "code = main(sys.argv[1:]); print(json.dumps({'code': code, "
        "'prefect': any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules)}))"
    )
    root = Path(__file__).resolve().parent.parent
    for argv in (
        ["run", "usage", "--data-dir", str(data_dir), "--db", str(db)],
        ["status", "--db", str(db)],
        ["processors", "--db", str(db)],
        ["query", "SELECT count(*) FROM usage_sessions", "--db", str(db)],
    ):
        done = subprocess.run(
            [sys.executable, "-c", script, *argv],
            capture_output=True,
            text=True,
            env=_isolated_env(tmp_path),
            cwd=root,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        verdict = json.loads(done.stdout.strip().splitlines()[-1])
        assert verdict == {"code": 0, "prefect": False}, (argv, done.stderr)
        if argv[0] == "run":
            assert "ran in this process (no Prefect server" in done.stderr
            assert done.stdout.splitlines()[2].split()[:3] == ["usage", "7", "7"]
    with connect(db) as con:
        assert con.execute(
            "SELECT processor_name, status, processed, flow_run_id FROM processor_runs"
        ).fetchall() == [("usage", "completed", 7, None)]
